//! Test harness: spawns the real binary on a loopback port it picks itself (`listen =
//! "127.0.0.1:0"`, address read back from its log), and talks plain HTTP/1.1 to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tributary_shared::{Batch, BlockBuilder, WireBlock};

pub const BIN: &str = env!("CARGO_BIN_EXE_tributary-aggregator");

/// Event times used by the tests: a minute boundary, five-minute aligned.
pub const T0: i64 = 1_764_000_000_000 / 300_000 * 300_000;

pub const AGENTS: &[(&str, &str)] = &[("gw-1", "secret-gw-1"), ("gw-2", "secret-gw-2")];

pub fn config_text(data_dir: &Path) -> String {
    let mut text = format!("data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n", data_dir.display().to_string());
    for (id, token) in AGENTS {
        text.push_str(&format!("[[agents]]\nid = \"{id}\"\ntoken = \"{token}\"\n"));
    }
    text
}

/// A running aggregator process. Killed (SIGKILL) on drop if still running.
pub struct Aggregator {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub stderr: Arc<Mutex<String>>,
}

impl Aggregator {
    /// Starts the binary with a config in `dir` (data in `dir/data`), waits until it listens.
    pub fn start(dir: &Path) -> Aggregator {
        Aggregator::start_with(dir, "")
    }

    /// [`Aggregator::start`] with `extra` TOML appended to the config (pipeline, rules, webhooks).
    pub fn start_with(dir: &Path, extra: &str) -> Aggregator {
        Aggregator::start_with_http(dir, "", extra)
    }

    /// [`Aggregator::start_with`] with `http_keys` added to the `[http]` table (read_token, CORS).
    pub fn start_with_http(dir: &Path, http_keys: &str, extra: &str) -> Aggregator {
        Aggregator::start_with_command(dir, http_keys, extra, |_| {})
    }

    /// [`Aggregator::start_with`] where no file may grow past `bytes` until
    /// [`Aggregator::lift_file_size_limit`] (`RLIMIT_FSIZE`, with SIGXFSZ ignored: a write past it
    /// fails as on a full disk): a disk that fills, for a test without the rights to mount one.
    pub fn start_with_file_size_limit(dir: &Path, extra: &str, bytes: u64) -> Aggregator {
        // The hard limit stays as it is (raising it would need privileges).
        let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit(2) into a valid rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut current) }, 0);
        let hard = current.rlim_max;
        Aggregator::start_with_command(dir, "", extra, |command| {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec only async-signal-safe calls (setrlimit, signal).
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: bytes.min(hard), rlim_max: hard };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0
                        || libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
    }

    /// Lets the files of an aggregator started by [`Aggregator::start_with_file_size_limit`] grow
    /// again: space freed on the disk.
    pub fn lift_file_size_limit(&self) {
        let pid = self.child.id() as i32;
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: prlimit(2) on our own child's pid: reads its limit into a valid rlimit, then
        // sets the soft limit to the hard one.
        let read = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut limit) };
        assert_eq!(read, 0, "prlimit: {}", std::io::Error::last_os_error());
        limit.rlim_cur = limit.rlim_max;
        let set = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
        assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    fn start_with_command(
        dir: &Path,
        http_keys: &str,
        extra: &str,
        configure: impl FnOnce(&mut Command),
    ) -> Aggregator {
        let data_dir = dir.join("data");
        let config = dir.join("aggregator.toml");
        let text = config_text(&data_dir).replacen("[http]\n", &format!("[http]\n{http_keys}"), 1);
        std::fs::write(&config, text + extra).unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!("aggregator did not start:\n{}", stderr.lock().unwrap());
            }
        };
        Aggregator { child, addr, data_dir, stderr }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM:\n{}", self.stderr.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn get(&self, path: &str) -> Response {
        http(self.addr, "GET", path, &[], &[])
    }

    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.get(path);
        (response.status, response.json())
    }

    /// POSTs a batch with a bearer token and a content type.
    pub fn ingest(&self, token: Option<&str>, content_type: &str, body: &[u8]) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", content_type.to_string())];
        if let Some(auth) = auth {
            headers.push(("Authorization", auth));
        }
        http(self.addr, "POST", "/api/v1/ingest", &headers, body)
    }

    /// POSTs a postcard batch as the agent `agent` (with its own token), expecting 200.
    pub fn ingest_ok(&self, agent: usize, body: &[u8]) -> serde_json::Value {
        let response = self.ingest(Some(AGENTS[agent].1), "application/x-postcard", body);
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    }

    /// A metric's value from `/metrics` (the full series name, labels included).
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").text();
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until the processor has committed everything in the log.
    pub fn wait_processed(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // Both from one scrape: between two scrapes the processor may commit and append the
            // derived readings (anomalies, alert transitions) of that commit to the log.
            let text = self.get("/metrics").text();
            let value = |name: &str| {
                text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' '))).map(str::to_string)
            };
            if value("tributary_log_end_offset") == value("tributary_processor_offset") {
                return;
            }
            assert!(Instant::now() < deadline, "processor did not catch up:\n{}", self.stderr.lock().unwrap());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Response {
    try_http(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`http`] that reports a refused or cut connection (e.g. a server killed mid-request) as an error.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(head.as_bytes())?;
    // The server may answer (413) and close before reading the whole body.
    let _ = stream.write_all(body);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed without a response"));
    }
    Ok(parse_response(&raw))
}

/// POSTs a postcard batch as `AGENTS[agent]` to a server that may be killed meanwhile.
pub fn try_ingest(addr: SocketAddr, agent: usize, body: &[u8]) -> std::io::Result<Response> {
    let headers = [
        ("Content-Type", "application/x-postcard".to_string()),
        ("Authorization", format!("Bearer {}", AGENTS[agent].1)),
    ];
    try_http(addr, "POST", "/api/v1/ingest", &headers, body)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no HTTP header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 2 + size + 2..];
        }
        body = out;
    }
    Response { status, headers, body }
}

/// One block's readings: (sensor, ts, value).
pub type Readings<'a> = &'a [(&'a str, i64, f64)];

/// A postcard batch of blocks given as (first_seq, readings).
pub fn postcard_batch(agent_id: &str, epoch: u64, blocks: &[(u64, Readings<'_>)]) -> Vec<u8> {
    let encoded: Vec<(u64, u32, Vec<u8>)> = blocks
        .iter()
        .map(|(first_seq, readings)| {
            let mut b = BlockBuilder::default();
            for (sensor, ts, value) in readings.iter() {
                b.push(sensor, *ts, *value);
            }
            (*first_seq, readings.len() as u32, b.finish().encode())
        })
        .collect();
    let batch = Batch {
        agent_id,
        epoch,
        blocks: encoded
            .iter()
            .map(|(first_seq, count, data)| WireBlock { first_seq: *first_seq, count: *count, data })
            .collect(),
    };
    batch.to_postcard()
}

/// `n` readings of `sensor`, one a second from `ts`, values 0, 1, 2, ...
pub fn steady(sensor: &'static str, ts: i64, n: usize) -> Vec<(&'static str, i64, f64)> {
    (0..n).map(|i| (sensor, ts + i as i64 * 1000, i as f64)).collect()
}

/// (blocks, readings) in the log, read from `log.db` directly.
pub fn log_totals(data_dir: &Path) -> (i64, i64) {
    let conn =
        rusqlite::Connection::open_with_flags(data_dir.join("log.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("SELECT COUNT(*), COALESCE(SUM(count), 0) FROM blocks", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap()
}

/// An empty batch: the agent's handshake, answered with the (agent, epoch)'s mark.
pub fn handshake(agent_id: &str, epoch: u64) -> Vec<u8> {
    Batch { agent_id, epoch, blocks: vec![] }.to_postcard()
}

/// (first_seq, count, data) of every logged block of an (agent, epoch), from `log.db` directly.
pub fn logged_blocks(data_dir: &Path, agent_id: &str, epoch: i64) -> Vec<(u64, u32, Vec<u8>)> {
    let conn =
        rusqlite::Connection::open_with_flags(data_dir.join("log.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT first_seq, count, data FROM blocks WHERE agent_id = ?1 AND epoch = ?2 ORDER BY first_offset")
        .unwrap();
    stmt.query_map(rusqlite::params![agent_id, epoch], |r| {
        Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u32, r.get(2)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// The `gaps` rows (from_seq, to_seq) of an (agent, epoch).
pub fn gap_rows(data_dir: &Path, agent_id: &str, epoch: i64) -> Vec<(u64, u64)> {
    let conn =
        rusqlite::Connection::open_with_flags(data_dir.join("log.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt =
        conn.prepare("SELECT from_seq, to_seq FROM gaps WHERE agent_id = ?1 AND epoch = ?2 ORDER BY from_seq").unwrap();
    stmt.query_map(rusqlite::params![agent_id, epoch], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Runs the binary with a config text and returns (exit status, stderr); the process must exit
/// by itself within a few seconds.
pub fn run_with_config(dir: &Path, text: &str) -> (ExitStatus, String, PathBuf) {
    let config = dir.join("aggregator.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10), "the aggregator with a bad config");
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, stderr, config)
}

/// Waits for `child` to exit by itself; kills it and fails the test past `within`.
pub fn wait_exit(child: &mut std::process::Child, within: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A webhook receiver on loopback: records each JSON body; answers `fail_first` requests with 503.
pub struct Receiver {
    pub url: String,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    pub fn start(fail_first: usize) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let sink = bodies.clone();
        std::thread::spawn(move || {
            let mut seen = 0;
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                seen += 1;
                let status = if seen <= fail_first { "503 Service Unavailable" } else { "200 OK" };
                if seen > fail_first {
                    sink.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null));
                }
                let _ = reader.get_mut().write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                );
            }
        });
        Receiver { url, bodies }
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }
}

/// The checksum `/api/v1/pipeline` gives pipeline version `v`'s tables, once it covers everything
/// in the log.
pub fn settled_checksum(agg: &Aggregator, v: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (_, p) = agg.get_json("/api/v1/pipeline");
        let r = p["versions"].as_array().and_then(|l| l.iter().find(|r| r["version"] == v)).cloned();
        if let Some(r) = r.filter(|r| r["checksum"].is_string()) {
            if r["checksum_offset"] == r["offset"] && r["offset"] == r["head"] {
                return r["checksum"].as_str().unwrap().to_string();
            }
        }
        assert!(Instant::now() < deadline, "no settled checksum for version {v}: {p}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The windows of `sizes` of every sensor and the sensor list, as the API serves them, minus what
/// depends on the wall clock (a sensor's online/stale status): for comparing two aggregators.
pub fn served_windows_and_sensors(agg: &Aggregator, sizes: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for size in sizes {
        let (status, body) = agg.get_json(&format!("/api/v1/windows?sensor=**&size={size}"));
        assert_eq!(status, 200, "{body}");
        out.insert(format!("windows {size}"), body);
    }
    let (_, mut sensors) = agg.get_json("/api/v1/sensors?limit=10000");
    for s in sensors.as_array_mut().unwrap() {
        s.as_object_mut().unwrap().remove("status");
    }
    out.insert("sensors".into(), sensors);
    out
}
