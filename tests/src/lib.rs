//! The end-to-end harness: starts the real `tributary-aggregator`, `tributary-agent` and Mosquitto
//! processes on loopback ports, publishes over real MQTT, and reads the real HTTP APIs.
//!
//! Every process writes its log to a file in the test's temporary directory; when a test panics,
//! the tail of each log is printed so a failure explains itself.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;

/// A built binary of the workspace, next to the test executable's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built: run the tests with `cargo test --workspace`", path.display());
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process with its log file; SIGKILLed when dropped.
pub struct Process {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Process {
    pub fn spawn(name: &str, program: PathBuf, args: Vec<String>, log: PathBuf) -> Process {
        let mut p = Process { name: name.into(), program, args, log, child: None };
        p.start();
        p
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open log");
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info,rumqttd=warn,rumqttd::server::broker=off")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("process is running")
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits up to 15 s for a clean exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("process is running");
        // SAFETY: kill(2) on a pid we own and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{} did not stop within 15 s of SIGTERM\n{}", self.name, self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running (it has not exited on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("wait").is_none(),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} log (last 30 lines) -----\n{}", self.name, self.log_tail(30));
        }
        self.kill9();
    }
}

/// One HTTP client for the harness. reqwest is built without a default TLS provider (as in the
/// agent), so one is installed first even though every URL here is plain http.
pub fn http() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("HTTP client")
    })
}

async fn http_get(url: &str) -> Option<(u16, Value)> {
    let response = http().get(url).send().await.ok()?;
    let status = response.status().as_u16();
    let body = response.bytes().await.ok()?;
    Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

async fn wait_healthy(process: &mut Process, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http().get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(process.is_running(), "{} exited at start:\n{}", process.name, process.log_tail(30));
        assert!(Instant::now() < deadline, "{} not healthy after 20 s:\n{}", process.name, process.log_tail(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `dir/<name>.toml` and starts `tributary-<name> --config` on it, logging to `dir/<name>.log`.
fn spawn_configured(dir: &Path, name: &str, config: &str) -> (Process, PathBuf) {
    let config_path = dir.join(format!("{name}.toml"));
    fs::write(&config_path, config).unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
    let process = Process::spawn(
        name,
        bin(&format!("tributary-{name}")),
        vec!["--config".into(), config_path.display().to_string()],
        dir.join(format!("{name}.log")),
    );
    (process, config_path)
}

/// A running `tributary-aggregator` with its own data dir and port.
pub struct Aggregator {
    pub process: Process,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl Aggregator {
    /// Starts an aggregator in `dir` that knows `agents` as (id, token).
    pub async fn start(dir: &Path, agents: &[(&str, &str)]) -> Aggregator {
        let port = free_port();
        let data_dir = dir.join("aggregator-data");
        let mut config =
            format!("data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n", data_dir.display().to_string());
        for (id, token) in agents {
            config.push_str(&format!("[[agents]]\nid = {id:?}\ntoken = {token:?}\n"));
        }
        let (process, _) = spawn_configured(dir, "aggregator", &config);
        let mut aggregator = Aggregator { process, port, data_dir };
        aggregator.wait_healthy().await;
        aggregator
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn wait_healthy(&mut self) {
        let url = format!("{}/healthz", self.url());
        wait_healthy(&mut self.process, &url).await;
    }

    pub async fn restart(&mut self) {
        self.process.start();
        self.wait_healthy().await;
    }

    /// GET a path of the API: (status, JSON body or null).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        http_get(&format!("{}{path}", self.url())).await.unwrap_or((0, Value::Null))
    }

    /// One metric of the aggregator's `/metrics`, 0 if absent.
    pub async fn metric(&self, key: &str) -> f64 {
        scrape(self.port).await.get(key).copied().unwrap_or(0.0)
    }

    /// `GET /api/v1/sensors` as id → count.
    pub async fn sensor_counts(&self) -> BTreeMap<String, u64> {
        let (_, body) = self.get("/api/v1/sensors").await;
        body.as_array()
            .map(|sensors| {
                sensors.iter().filter_map(|s| Some((s["id"].as_str()?.to_string(), s["count"].as_u64()?))).collect()
            })
            .unwrap_or_default()
    }

    /// The sum of the sensor counts: every reading the API has processed.
    pub async fn total_readings(&self) -> u64 {
        self.sensor_counts().await.values().sum()
    }

    /// `GET /api/v1/sensors/{id}/windows` (1-minute) as start → count.
    pub async fn window_counts(&self, sensor: &str) -> BTreeMap<i64, u64> {
        let (_, body) = self.get(&format!("/api/v1/sensors/{}/windows?size=1m", encode_path_segment(sensor))).await;
        body.as_array()
            .map(|ws| ws.iter().filter_map(|w| Some((w["start"].as_i64()?, w["count"].as_u64()?))).collect())
            .unwrap_or_default()
    }

    /// Blocks and readings in the log, read from the SQLite file itself.
    pub fn log_contents(&self) -> (i64, i64) {
        let conn = rusqlite::Connection::open_with_flags(
            self.data_dir.join("log.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open log.db");
        conn.query_row("SELECT count(*), coalesce(sum(count), 0) FROM blocks", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query log.db")
    }
}

/// Percent-encodes a sensor id for a URL path segment (`/` becomes `%2F`).
pub fn encode_path_segment(id: &str) -> String {
    let mut out = String::new();
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// How an agent gets its MQTT messages.
pub enum MqttInput {
    /// Its own rumqttd broker on a port the harness picks.
    Embedded,
    /// A client of the broker at this port, with this client id.
    Client { port: u16 },
}

/// A running `tributary-agent`.
pub struct Agent {
    pub process: Process,
    pub http_port: u16,
    /// The MQTT port sensors publish to: the embedded broker's, or the external broker's.
    pub mqtt_port: u16,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
}

impl Agent {
    /// Starts agent `id` in `dir`, forwarding to `upstream` with `token`. `extra` is appended to
    /// the configuration (e.g. a `[spool]` table).
    pub async fn start(dir: &Path, id: &str, token: &str, upstream: &str, input: MqttInput, extra: &str) -> Agent {
        let http_port = free_port();
        let data_dir = dir.join("agent-data");
        let (mqtt, mqtt_port) = match input {
            MqttInput::Embedded => {
                let port = free_port();
                (format!("[mqtt]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n"), port)
            }
            MqttInput::Client { port } => (
                format!(
                    "[mqtt]\nmode = \"client\"\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"tributary-{id}\"\n"
                ),
                port,
            ),
        };
        let config = format!(
            "agent_id = {id:?}\ndata_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [upstream]\nurl = {upstream:?}\ntoken = {token:?}\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n{mqtt}{extra}",
            data_dir.display().to_string()
        );
        let (process, config_path) = spawn_configured(dir, "agent", &config);
        let mut agent = Agent { process, http_port, mqtt_port, data_dir, config_path };
        agent.wait_healthy().await;
        agent
    }

    pub async fn wait_healthy(&mut self) {
        let url = format!("http://127.0.0.1:{}/healthz", self.http_port);
        wait_healthy(&mut self.process, &url).await;
    }

    pub async fn restart(&mut self) {
        self.process.start();
        self.wait_healthy().await;
    }

    /// The agent's `/metrics` as "name{labels}" → value.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        scrape(self.http_port).await
    }

    /// One metric, 0 if absent.
    pub async fn metric(&self, key: &str) -> f64 {
        self.metrics().await.get(key).copied().unwrap_or(0.0)
    }
}

/// `/metrics` of the process on `port`, as "name{labels}" → value (empty if unreachable).
pub async fn scrape(port: u16) -> HashMap<String, f64> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    match http().get(&url).send().await {
        Ok(r) => parse_metrics(&r.text().await.unwrap_or_default()),
        Err(_) => HashMap::new(),
    }
}

/// Parses Prometheus / OpenMetrics text into "name{labels}" → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Mosquitto, an aggregator that knows agent `id` (token `secret-<id>`), and that agent joined to
/// Mosquitto as a client: the client-mode set-up.
pub async fn start_client_mode(dir: &Path, id: &str) -> (Mosquitto, Aggregator, Agent) {
    let mosquitto = Mosquitto::start(dir).await;
    let token = format!("secret-{id}");
    let aggregator = Aggregator::start(dir, &[(id, &token)]).await;
    let input = MqttInput::Client { port: mosquitto.port };
    let agent = Agent::start(dir, id, &token, &aggregator.url(), input, "").await;
    (mosquitto, aggregator, agent)
}

/// A real Mosquitto broker on its own port, keeping sessions of disconnected clients.
pub struct Mosquitto {
    pub process: Process,
    pub port: u16,
}

impl Mosquitto {
    pub async fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        let config = dir.join("mosquitto.conf");
        fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 100000\nmax_inflight_messages 100\nlog_type error\nlog_type warning\n"
            ),
        )
        .expect("write mosquitto.conf");
        let program = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("mosquitto is not installed: `apt-get install mosquitto` (.ci/run does)");
        let process = Process::spawn(
            "mosquitto",
            program,
            vec!["-c".into(), config.display().to_string()],
            dir.join("mosquitto.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Mosquitto { process, port }
    }
}

/// Publishes `messages` (topic, payload) to the broker on `port` with QoS 1 and returns once the
/// broker has acknowledged every one.
pub async fn publish(port: u16, client_id: &str, messages: &[(String, Vec<u8>)]) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(4 << 20, 4 << 20).set_inflight(50);
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let total = messages.len();
    let to_send = messages.to_vec();
    // Publishing from a task other than the one polling the event loop: rumqttc deadlocks otherwise.
    let sender = tokio::spawn(async move {
        for (topic, payload) in to_send {
            client.publish(topic, QoS::AtLeastOnce, false, payload).await.expect("publish");
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < total {
        assert!(Instant::now() < deadline, "only {acked} of {total} publishes acknowledged");
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("MQTT publisher on port {port}: {e}"),
            Err(_) => panic!("MQTT publisher on port {port}: no event for 10 s ({acked}/{total} acknowledged)"),
        }
    }
    let client = sender.await.expect("publisher task");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(e) = eventloop.poll().await {
            if matches!(e, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

impl Process {
    /// SIGTERM, then waits up to `wait` for the exit: its status, or `None` if it was still running
    /// (it is SIGKILLed then).
    pub fn terminate_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("process is running");
        // SAFETY: kill(2) on a pid we own and have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Aggregator {
    /// Every reading in the log as (sensor, ts, value), decoded from the SQLite file itself.
    pub fn logged_readings(&self) -> Vec<(String, i64, f64)> {
        let conn = rusqlite::Connection::open_with_flags(
            self.data_dir.join("log.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open log.db");
        let mut statement = conn.prepare("SELECT data FROM blocks ORDER BY first_offset").expect("query log.db");
        let blobs: Vec<Vec<u8>> =
            statement.query_map([], |r| r.get(0)).expect("query log.db").collect::<Result<_, _>>().expect("read");
        let mut out = Vec::new();
        for blob in blobs {
            let block = tributary_shared::Block::decode(&blob).expect("a logged block decodes");
            out.extend(block.readings().map(|(sensor, ts, value)| (sensor.to_string(), ts, value)));
        }
        out
    }
}

/// One publish as a battery-powered device does it: connect, publish one QoS-1 message, wait for
/// its PUBACK, disconnect. Whether the broker acknowledged it (a refused or dropped connection,
/// or no PUBACK within 5 s, is `false`).
pub async fn publish_once(port: u16, client_id: &str, topic: &str, payload: Vec<u8>) -> bool {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    if client.try_publish(topic, QoS::AtLeastOnce, false, payload).is_err() {
        return false;
    }
    let acked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if acked && client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(e) = eventloop.poll().await {
                if matches!(e, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
    acked
}
