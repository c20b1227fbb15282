//! The end-to-end harness: starts the real `tributary-aggregator`, `tributary-agent` and Mosquitto
//! processes on loopback ports, publishes over real MQTT, and reads the real HTTP APIs.
//!
//! Every process writes its log to a file in the test's temporary directory; when a test panics,
//! the tail of each log is printed so a failure explains itself.

pub mod certs;

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

async fn http_get(client: &reqwest::Client, url: &str) -> Option<(u16, Value)> {
    let response = client.get(url).send().await.ok()?;
    let status = response.status().as_u16();
    let body = response.bytes().await.ok()?;
    Some((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

async fn wait_healthy(client: &reqwest::Client, process: &mut Process, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = client.get(url).send().await {
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
    /// `https` when it serves TLS ([`Aggregator::start_tls`]), else `http`.
    scheme: &'static str,
    /// How the harness reaches it: [`http()`], or a client that trusts its CA.
    client: reqwest::Client,
}

impl Aggregator {
    /// Starts an aggregator in `dir` that knows `agents` as (id, token).
    pub async fn start(dir: &Path, agents: &[(&str, &str)]) -> Aggregator {
        Aggregator::start_with(dir, agents, "").await
    }

    /// [`Aggregator::start`] with `extra` appended to its configuration (e.g. `[[alerts]]`).
    pub async fn start_with(dir: &Path, agents: &[(&str, &str)], extra: &str) -> Aggregator {
        Aggregator::start_configured(dir, agents, "", extra, "http", http().clone()).await
    }

    /// An aggregator serving HTTPS: `http_keys` go into its `[http]` table (`tls_cert = ...`),
    /// and `client` is how the harness reaches it (trusting its CA; with a client certificate if
    /// `tls_client_ca` asks for one).
    pub async fn start_tls(
        dir: &Path,
        agents: &[(&str, &str)],
        http_keys: &str,
        client: reqwest::Client,
    ) -> Aggregator {
        Aggregator::start_configured(dir, agents, http_keys, "", "https", client).await
    }

    async fn start_configured(
        dir: &Path,
        agents: &[(&str, &str)],
        http_keys: &str,
        extra: &str,
        scheme: &'static str,
        client: reqwest::Client,
    ) -> Aggregator {
        let port = free_port();
        let data_dir = dir.join("aggregator-data");
        let mut config = format!(
            "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:{port}\"\n{http_keys}\n",
            data_dir.display().to_string()
        );
        for (id, token) in agents {
            config.push_str(&format!("[[agents]]\nid = {id:?}\ntoken = {token:?}\n"));
        }
        config.push_str(extra);
        let (process, _) = spawn_configured(dir, "aggregator", &config);
        let mut aggregator = Aggregator { process, port, data_dir, scheme, client };
        aggregator.wait_healthy().await;
        aggregator
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port)
    }

    pub async fn wait_healthy(&mut self) {
        let url = format!("{}/healthz", self.url());
        wait_healthy(&self.client, &mut self.process, &url).await;
    }

    pub async fn restart(&mut self) {
        self.process.start();
        self.wait_healthy().await;
    }

    /// GET a path of the API: (status, JSON body or null).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        http_get(&self.client, &format!("{}{path}", self.url())).await.unwrap_or((0, Value::Null))
    }

    /// One metric of the aggregator's `/metrics`, 0 if absent.
    pub async fn metric(&self, key: &str) -> f64 {
        scrape_url(&self.client, &format!("{}/metrics", self.url())).await.get(key).copied().unwrap_or(0.0)
    }

    /// `GET /api/v1/sensors` as id → count, every page (following `Link: <...>; rel="next"`).
    pub async fn sensor_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        let mut next = Some("/api/v1/sensors?limit=10000".to_string());
        while let Some(path) = next.take() {
            let Ok(response) = self.client.get(format!("{}{path}", self.url())).send().await else { break };
            next = response
                .headers()
                .get("link")
                .and_then(|link| link.to_str().ok())
                .and_then(|link| Some(link.strip_prefix('<')?.split_once(">; rel=\"next\"")?.0.to_string()));
            let body = response.bytes().await.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
            let body = body.unwrap_or(Value::Null);
            for sensor in body.as_array().into_iter().flatten() {
                if let (Some(id), Some(count)) = (sensor["id"].as_str(), sensor["count"].as_u64()) {
                    counts.insert(id.to_string(), count);
                }
            }
        }
        counts
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
    /// A client of the broker's TLS listener at this port (`mqtts://`); `extra` sets `ca_file` etc.
    ClientTls { port: u16 },
}

/// The agent's own health readings (`_agent/<id>/...`) are off unless a test's `extra` sets
/// `[health]`: most tests count exactly the readings they sent. Placed before the first table, as
/// `extra` may go on with the keys of the last one.
fn health_off(extra: &str) -> &'static str {
    if extra.contains("[health]") { "" } else { "[health]\ninterval = \"0s\"\n" }
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
        Agent::start_with_upstream(dir, id, token, upstream, input, "", extra).await
    }

    /// [`Agent::start`] with `upstream_keys` added to its `[upstream]` table (e.g. `ca_file = ...`).
    pub async fn start_with_upstream(
        dir: &Path,
        id: &str,
        token: &str,
        upstream: &str,
        input: MqttInput,
        upstream_keys: &str,
        extra: &str,
    ) -> Agent {
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
            MqttInput::ClientTls { port } => (
                format!(
                    "[mqtt]\nmode = \"client\"\nurl = \"mqtts://127.0.0.1:{port}\"\nclient_id = \"tributary-{id}\"\n"
                ),
                port,
            ),
        };
        let config = format!(
            "agent_id = {id:?}\ndata_dir = {:?}\n{}[http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [upstream]\nurl = {upstream:?}\ntoken = {token:?}\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n\
             {upstream_keys}\n{mqtt}{extra}",
            data_dir.display().to_string(),
            health_off(extra)
        );
        let (process, config_path) = spawn_configured(dir, "agent", &config);
        let mut agent = Agent { process, http_port, mqtt_port, data_dir, config_path };
        agent.wait_healthy().await;
        agent
    }

    pub async fn wait_healthy(&mut self) {
        let url = format!("http://127.0.0.1:{}/healthz", self.http_port);
        wait_healthy(http(), &mut self.process, &url).await;
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
    scrape_url(http(), &format!("http://127.0.0.1:{port}/metrics")).await
}

/// `/metrics` at `url` through `client`, as [`scrape`].
pub async fn scrape_url(client: &reqwest::Client, url: &str) -> HashMap<String, f64> {
    match client.get(url).send().await {
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
    /// The TLS listener's port, if started with one ([`Mosquitto::start_with_tls`]).
    pub tls_port: Option<u16>,
}

/// A TLS listener for Mosquitto, beside its plain one: PEM files (absolute paths).
pub struct MosquittoTls<'a> {
    /// The CA that client certificates must be signed by (Mosquitto's `cafile`).
    pub cafile: &'a Path,
    pub certfile: &'a Path,
    pub keyfile: &'a Path,
    /// Every client must show a certificate signed by `cafile`.
    pub require_certificate: bool,
}

impl Mosquitto {
    pub async fn start(dir: &Path) -> Mosquitto {
        Mosquitto::start_with_users(dir, &[]).await
    }

    /// [`Mosquitto::start`] that lets in only `users` (username, password), from a password file
    /// made with `mosquitto_passwd`; with none, anyone.
    pub async fn start_with_users(dir: &Path, users: &[(&str, &str)]) -> Mosquitto {
        Mosquitto::start_configured(dir, users, None).await
    }

    /// [`Mosquitto::start`] with a TLS listener on `tls_port` besides the plain one on `port`.
    pub async fn start_with_tls(dir: &Path, tls: &MosquittoTls<'_>) -> Mosquitto {
        Mosquitto::start_configured(dir, &[], Some(tls)).await
    }

    async fn start_configured(dir: &Path, users: &[(&str, &str)], tls: Option<&MosquittoTls<'_>>) -> Mosquitto {
        let port = free_port();
        let tls_port = tls.map(|_| free_port());
        // Per-listener keys follow their `listener` line: the TLS one comes last.
        let tls_listener = match (tls, tls_port) {
            (Some(tls), Some(tls_port)) => format!(
                "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                tls.cafile.display(),
                tls.certfile.display(),
                tls.keyfile.display(),
                tls.require_certificate
            ),
            _ => String::new(),
        };
        let config = dir.join("mosquitto.conf");
        let auth = match users {
            [] => "allow_anonymous true\n".to_string(),
            users => {
                let passwords = dir.join("mosquitto.passwd");
                fs::write(&passwords, "").expect("write mosquitto.passwd");
                for (user, password) in users {
                    let status = Command::new("mosquitto_passwd")
                        .arg("-b")
                        .arg(&passwords)
                        .args([user, password])
                        .status()
                        .expect("mosquitto_passwd (installed with mosquitto)");
                    assert!(status.success(), "mosquitto_passwd {user}: {status}");
                }
                format!("allow_anonymous false\npassword_file {}\n", passwords.display())
            }
        };
        fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n{auth}persistence false\n\
                 max_queued_messages 100000\nmax_inflight_messages 100\nlog_type error\nlog_type warning\n\
                 {tls_listener}"
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
        for port in std::iter::once(port).chain(tls_port) {
            while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                assert!(Instant::now() < deadline, "mosquitto did not listen on {port}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Mosquitto { process, port, tls_port }
    }
}

/// Publishes `messages` (topic, payload) to the broker on `port` with QoS 1 and returns once the
/// broker has acknowledged every one.
pub async fn publish(port: u16, client_id: &str, messages: &[(String, Vec<u8>)]) {
    publish_as(port, client_id, None, messages).await
}

/// [`publish`], logging in with `login` (username, password).
pub async fn publish_as(port: u16, client_id: &str, login: Option<(&str, &str)>, messages: &[(String, Vec<u8>)]) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(4 << 20, 4 << 20).set_inflight(50);
    if let Some((username, password)) = login {
        options.set_credentials(username, password);
    }
    if let Err(e) = try_publish_with(options, messages).await {
        panic!("MQTT publisher on port {port}: {e}");
    }
}

/// Publishes `messages` at QoS 1 through a client made with `options` and waits until every one
/// is acknowledged; the first connection error, 10 s without an event or 60 s in all is an error
/// (no retry: a refused client stays refused).
pub async fn try_publish_with(options: MqttOptions, messages: &[(String, Vec<u8>)]) -> Result<(), String> {
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let total = messages.len();
    let to_send = messages.to_vec();
    // Publishing from a task other than the one polling the event loop: rumqttc deadlocks otherwise.
    let sender = tokio::spawn(async move {
        for (topic, payload) in to_send {
            if client.publish(topic, QoS::AtLeastOnce, false, payload).await.is_err() {
                break;
            }
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < total {
        let failed = match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            _ if Instant::now() >= deadline => Some(format!("only {acked} of {total} publishes acknowledged")),
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                acked += 1;
                None
            }
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("{e} ({e:?})")),
            Err(_) => Some(format!("no event for 10 s ({acked}/{total} acknowledged)")),
        };
        if let Some(error) = failed {
            sender.abort();
            return Err(error);
        }
    }
    let client = sender.await.map_err(|e| format!("publisher task: {e}"))?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(e) = eventloop.poll().await {
            if matches!(e, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

impl Agent {
    /// Like [`Agent::start`], with extra environment variables for the agent process (started
    /// through `env`, which execs it, so the pid and SIGKILL are the agent's own).
    pub async fn start_with_env(
        dir: &Path,
        id: &str,
        token: &str,
        upstream: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Agent {
        let (http_port, mqtt_port) = (free_port(), free_port());
        let data_dir = dir.join("agent-data");
        let config = format!(
            "agent_id = {id:?}\ndata_dir = {:?}\n{}[http]\nlisten = \"127.0.0.1:{http_port}\"\n\
             [upstream]\nurl = {upstream:?}\ntoken = {token:?}\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n\
             [mqtt]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt_port}\"\n{extra}",
            data_dir.display().to_string(),
            health_off(extra)
        );
        let config_path = dir.join("agent.toml");
        fs::write(&config_path, config).expect("write agent.toml");
        let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.push(bin("tributary-agent").display().to_string());
        args.extend(["--config".to_string(), config_path.display().to_string()]);
        let process = Process::spawn("agent", PathBuf::from("/usr/bin/env"), args, dir.join("agent.log"));
        let mut agent = Agent { process, http_port, mqtt_port, data_dir, config_path };
        agent.wait_healthy().await;
        agent
    }

    /// Runs `tributary-agent --config <its config> <args>` to completion: (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(bin("tributary-agent"))
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .expect("run tributary-agent");
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (output.status.success(), text(&output.stdout), text(&output.stderr))
    }
}

/// How [`RefusingProxy`] answers while refusing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 413 with an HTML page, as nginx does past `client_max_body_size`.
    TooLarge,
    /// 400 with a plain-text body: a proxy's, not the aggregator's verdict on the data.
    PlainBadRequest,
    /// 502: the proxy cannot reach the aggregator.
    BadGateway,
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    pub at: Instant,
    pub body_len: usize,
    pub status: u16,
    /// (first_seq, count) of each block of the batch, if it decoded.
    pub blocks: Vec<(u64, u32)>,
}

#[derive(Default)]
struct ProxyRules {
    refusals: Vec<Refusal>,
    next_refusal: usize,
    max_body: Option<usize>,
    refused_sensor: Option<String>,
    seen: Vec<ProxiedRequest>,
}

/// A stand-in for a reverse proxy in front of the aggregator (nginx, a site's HTTP gateway), which
/// cannot run here: it serves `<prefix>/api/v1/ingest` on loopback and forwards to a real
/// aggregator, unless told to refuse. It can also stand in for the aggregator's
/// `400 invalid_block` verdict, which an agent cannot be made to provoke with the blocks it encodes.
pub struct RefusingProxy {
    pub port: u16,
    prefix: String,
    rules: std::sync::Arc<std::sync::Mutex<ProxyRules>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RefusingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RefusingProxy {
    /// Starts the proxy in front of the aggregator at `upstream`, under the path `prefix`
    /// (e.g. `/tributary`, or `` for none).
    pub async fn start(upstream: &str, prefix: &str) -> RefusingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let rules = std::sync::Arc::new(std::sync::Mutex::new(ProxyRules::default()));
        let (state, path, upstream) = (rules.clone(), format!("{prefix}/api/v1/ingest"), upstream.to_string());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(proxy_one(stream, state.clone(), path.clone(), upstream.clone()));
            }
        });
        RefusingProxy { port, prefix: prefix.to_string(), rules, task }
    }

    /// The base URL agents are configured with.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}{}", self.port, self.prefix)
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, ProxyRules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers every request with these refusals in turn (none: forward).
    pub fn refuse(&self, refusals: &[Refusal]) {
        let mut rules = self.rules();
        rules.refusals = refusals.to_vec();
        rules.next_refusal = 0;
    }

    /// Answers 413 to bodies larger than this, always.
    pub fn limit_body(&self, max: Option<usize>) {
        self.rules().max_body = max;
    }

    /// Answers `400 invalid_block` for the first block holding a reading of a sensor whose id
    /// starts with `prefix`, as the aggregator does for a block it refuses for good.
    pub fn refuse_blocks_of_sensor(&self, prefix: Option<&str>) {
        self.rules().refused_sensor = prefix.map(str::to_string);
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<ProxiedRequest> {
        self.rules().seen.clone()
    }
}

async fn proxy_one(
    mut stream: tokio::net::TcpStream,
    rules: std::sync::Arc<std::sync::Mutex<ProxyRules>>,
    path: String,
    upstream: String,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 16 {
            return;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let target = lines.next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(1 << 16)];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let batch = tributary_shared::Batch::from_postcard(&body).ok();
    let blocks: Vec<(u64, u32)> =
        batch.as_ref().map(|b| b.blocks.iter().map(|w| (w.first_seq, w.count)).collect()).unwrap_or_default();
    let verdict = {
        let mut r = rules.lock().unwrap_or_else(|p| p.into_inner());
        if target != path {
            Some((404, "text/plain", b"not found".to_vec()))
        } else if r.max_body.is_some_and(|max| body.len() > max) {
            Some((413, "text/html", b"<html><body><h1>413 Request Entity Too Large</h1></body></html>".to_vec()))
        } else if !r.refusals.is_empty() {
            let refusal = r.refusals[r.next_refusal % r.refusals.len()];
            r.next_refusal += 1;
            Some(match refusal {
                Refusal::TooLarge => (413, "text/html", b"<html>413 Request Entity Too Large</html>".to_vec()),
                Refusal::PlainBadRequest => (400, "text/plain", b"Bad Request".to_vec()),
                Refusal::BadGateway => (502, "text/html", b"<html>502 Bad Gateway</html>".to_vec()),
            })
        } else {
            r.refused_sensor.as_deref().and_then(|prefix| {
                let batch = batch.as_ref()?;
                batch.blocks.iter().enumerate().find_map(|(i, w)| {
                    let block = w.decode().ok()?;
                    block.sensors.iter().any(|s| s.starts_with(prefix)).then(|| {
                        let answer = serde_json::json!({
                            "error": "invalid_block",
                            "detail": format!("block #{i}: sensor {prefix}...: refused (stand-in verdict)"),
                            "block": i, "first_seq": w.first_seq, "permanent": true,
                        });
                        (400, "application/json", answer.to_string().into_bytes())
                    })
                })
            })
        }
    };
    let (status, content_type, answer) = match verdict {
        Some(v) => v,
        None => {
            let mut request = http().post(format!("{upstream}/api/v1/ingest")).body(body.clone());
            for name in ["authorization", "content-type"] {
                if let Some(v) = header(name) {
                    request = request.header(name, v);
                }
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    (status, "application/json", response.bytes().await.map(|b| b.to_vec()).unwrap_or_default())
                }
                Err(_) => (502, "text/html", b"<html>502 Bad Gateway</html>".to_vec()),
            }
        }
    };
    rules.lock().unwrap_or_else(|p| p.into_inner()).seen.push(ProxiedRequest {
        at: Instant::now(),
        body_len: body.len(),
        status,
        blocks,
    });
    let head = format!(
        "HTTP/1.1 {status} Stand-in\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&answer).await;
    let _ = stream.shutdown().await;
}
/// One block of the aggregator's log, read from `log.db` itself.
#[derive(Debug, Clone)]
pub struct LoggedBlock {
    pub first_offset: i64,
    pub agent_id: String,
    pub epoch: i64,
    pub first_seq: i64,
    pub count: i64,
    pub data: Vec<u8>,
}

impl Aggregator {
    fn open_log(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(self.data_dir.join("log.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open log.db")
    }

    /// Every block of the log in offset order (decode them with `tributary_shared::Block::decode`).
    pub fn log_blocks(&self) -> Vec<LoggedBlock> {
        let conn = self.open_log();
        let mut stmt = conn
            .prepare("SELECT first_offset, agent_id, epoch, first_seq, count, data FROM blocks ORDER BY first_offset")
            .expect("query log.db");
        stmt.query_map([], |r| {
            Ok(LoggedBlock {
                first_offset: r.get(0)?,
                agent_id: r.get(1)?,
                epoch: r.get(2)?,
                first_seq: r.get(3)?,
                count: r.get(4)?,
                data: r.get(5)?,
            })
        })
        .and_then(|rows| rows.collect())
        .expect("read log.db")
    }

    /// Sequence numbers the aggregator recorded as never sent (the agent dropped them by policy).
    pub fn log_gap_readings(&self) -> i64 {
        self.open_log()
            .query_row("SELECT coalesce(sum(to_seq - from_seq), 0) FROM gaps", [], |r| r.get(0))
            .expect("query gaps in log.db")
    }
}

/// A QoS-1 publisher that records which of its messages the broker acknowledged (PUBACK), by the
/// id the caller gives each message. One task publishes, another polls the event loop (rumqttc
/// deadlocks otherwise); packet ids are matched to messages in the order they go out.
pub struct AckedPublisher {
    client: AsyncClient,
    state: std::sync::Arc<std::sync::Mutex<PublisherState>>,
    poller: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct PublisherState {
    /// Ids handed to the client, not yet sent as a PUBLISH packet.
    queued: std::collections::VecDeque<u64>,
    /// Packet id → message id, sent and not yet acknowledged.
    inflight: HashMap<u16, u64>,
    acked: Vec<u64>,
    sent: u64,
    error: Option<String>,
}

impl AckedPublisher {
    pub fn connect(port: u16, client_id: &str) -> AckedPublisher {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30)).set_max_packet_size(4 << 20, 4 << 20).set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let state = std::sync::Arc::new(std::sync::Mutex::new(PublisherState::default()));
        let shared = state.clone();
        let poller = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let mut s = shared.lock().expect("publisher state");
                match event {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(id) = s.queued.pop_front() {
                            s.inflight.insert(pkid, id);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(id) = s.inflight.remove(&ack.pkid) {
                            s.acked.push(id);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        // A reconnect would resend unacknowledged packets and blur the record: stop.
                        s.error = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        AckedPublisher { client, state, poller }
    }

    /// Queues message `id`; returns once the client has taken it (not when it is acknowledged).
    pub async fn publish(&self, id: u64, topic: &str, payload: Vec<u8>) {
        {
            let mut s = self.state.lock().expect("publisher state");
            if let Some(e) = &s.error {
                panic!("MQTT publisher failed: {e}");
            }
            s.queued.push_back(id);
            s.sent += 1;
        }
        self.client.publish(topic, QoS::AtLeastOnce, false, payload).await.expect("publish");
    }

    /// (sent, acknowledged) so far.
    pub fn progress(&self) -> (u64, u64) {
        let s = self.state.lock().expect("publisher state");
        (s.sent, s.acked.len() as u64)
    }

    /// Waits (up to `timeout`) for every sent message to be acknowledged, disconnects, and returns
    /// the acknowledged ids.
    pub async fn finish(self, timeout: Duration) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let (sent, acked) = self.progress();
            let failed = self.state.lock().expect("publisher state").error.clone();
            if let Some(e) = failed {
                panic!("MQTT publisher failed: {e} ({acked}/{sent} acknowledged)");
            }
            if acked == sent {
                break;
            }
            assert!(Instant::now() < deadline, "only {acked} of {sent} publishes acknowledged after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.poller).await;
        std::mem::take(&mut self.state.lock().expect("publisher state").acked)
    }
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

/// A socat pseudo-terminal pair standing in for a serial cable: the agent opens `agent_end`, the
/// simulator `device_end`. Killing socat is unplugging the device.
pub struct SerialLine {
    socat: Process,
    pub agent_end: PathBuf,
    pub device_end: PathBuf,
}

impl SerialLine {
    pub fn start(dir: &Path, name: &str) -> SerialLine {
        let agent_end = dir.join(format!("{name}-agent"));
        let device_end = dir.join(format!("{name}-device"));
        let program = ["/usr/bin/socat", "/bin/socat"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("socat is not installed: `apt-get install socat` (.ci/run does)");
        let pty = |link: &Path| format!("pty,raw,echo=0,link={}", link.display());
        let socat = Process::spawn(
            &format!("socat {name}"),
            program,
            vec!["-d".into(), "-d".into(), pty(&agent_end), pty(&device_end)],
            dir.join(format!("socat-{name}.log")),
        );
        let mut line = SerialLine { socat, agent_end, device_end };
        line.wait_for_links();
        line
    }

    fn wait_for_links(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.agent_end.exists() && self.device_end.exists()) {
            assert!(self.socat.is_running(), "socat exited:\n{}", self.socat.log_tail(10));
            assert!(Instant::now() < deadline, "socat made no pty links:\n{}", self.socat.log_tail(10));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The device goes away: socat dies without cleaning up, as a yanked USB adapter would.
    pub fn unplug(&mut self) {
        self.socat.kill9();
        // SIGKILL leaves the links dangling (or pointing at a pty someone else gets next).
        let _ = std::fs::remove_file(&self.agent_end);
        let _ = std::fs::remove_file(&self.device_end);
    }

    /// The device comes back, on the same link paths.
    pub fn plug(&mut self) {
        self.socat.start();
        self.wait_for_links();
    }

    /// Writes bytes into the device's end, as a device would.
    pub fn write(&self, bytes: &[u8]) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // O_NOCTTY: the test process must not adopt the pty as its controlling terminal.
        let mut tty = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&self.device_end)
            .expect("open the device end");
        tty.write_all(bytes).expect("write to the pty");
        tty.flush().expect("flush the pty");
    }
}
