//! `GET /api/v1/stream`: Server-Sent Events from the real aggregator, read off a raw socket as a
//! browser's EventSource reads them.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use common::{Aggregator, T0, postcard_batch};

#[derive(Debug, Clone)]
struct SseEvent {
    id: String,
    kind: String,
    data: serde_json::Value,
}

/// An open stream; events arrive on a channel from a reader thread.
struct Stream {
    events: mpsc::Receiver<SseEvent>,
    status: u16,
    content_type: String,
}

fn open(addr: SocketAddr, query: &str, last_event_id: Option<&str>) -> Stream {
    let (head, mut reader) = request(addr, query, last_event_id);
    let (status, content_type) = (head.status, head.content_type);
    let (tx, events) = mpsc::channel();
    std::thread::spawn(move || {
        // Chunked transfer: chunk-size lines are not `field: value` lines and are skipped.
        let (mut id, mut kind, mut data) = (String::new(), String::new(), String::new());
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
            let text = line.trim_end_matches(['\r', '\n']);
            if let Some(v) = text.strip_prefix("id:") {
                id = v.trim().to_string();
            } else if let Some(v) = text.strip_prefix("event:") {
                kind = v.trim().to_string();
            } else if let Some(v) = text.strip_prefix("data:") {
                data.push_str(v.trim());
            } else if text.is_empty() && !data.is_empty() {
                let event = SseEvent { id: id.clone(), kind: kind.clone(), data: serde_json::from_str(&data).unwrap() };
                if tx.send(event).is_err() {
                    return;
                }
                data.clear();
            }
            line.clear();
        }
    });
    Stream { events, status, content_type }
}

impl Stream {
    /// The first event of `kind` within 20 s whose data passes `pred`.
    fn wait_for(&self, kind: &str, pred: impl Fn(&serde_json::Value) -> bool) -> SseEvent {
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let event = self.events.recv_timeout(left).unwrap_or_else(|_| panic!("no {kind} event within 20 s"));
            if event.kind == kind && pred(&event.data) {
                return event;
            }
        }
    }

    /// Every event that arrives within `wait`.
    fn drain(&self, wait: Duration) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Ok(event) = self.events.recv_timeout(wait) {
            out.push(event);
        }
        out
    }
}

fn has_reading(data: &serde_json::Value, sensor: &str, value: f64) -> bool {
    data["readings"].as_array().is_some_and(|r| r.iter().any(|x| x[0] == sensor && x[2] == value))
}

#[test]
fn a_client_sees_readings_windows_and_alerts_of_its_sensors_live() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), "[[alerts]]\nname = \"hot\"\nsensor = \"room1/*\"\nabove = 100.0\n");
    let stream = open(agg.addr, "?sensor=room1/*", None);
    assert_eq!(stream.status, 200);
    assert!(stream.content_type.starts_with("text/event-stream"), "{}", stream.content_type);
    let everything = open(agg.addr, "", None);
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &[("room1/temp", T0, 21.5), ("room2/temp", T0, 19.0)])]));
    let event = stream.wait_for("reading", |d| has_reading(d, "room1/temp", 21.5));
    assert!(!event.data["readings"].as_array().unwrap().iter().any(|r| r[0] == "room2/temp"), "{:?}", event.data);
    assert_eq!(event.data["omitted"], 0);
    assert!(event.id.parse::<u64>().is_ok(), "{event:?}");
    let window =
        stream.wait_for("window", |d| d.as_array().is_some_and(|w| w.iter().any(|w| w["sensor"] == "room1/temp")));
    let w = &window.data.as_array().unwrap()[0];
    assert_eq!((w["start"].as_i64(), w["count"].as_u64(), w["mean"].as_f64()), (Some(T0), Some(1), Some(21.5)));
    // No filter: both sensors, and the agent's state.
    everything.wait_for("reading", |d| has_reading(d, "room2/temp", 19.0));
    everything.wait_for("agent", |d| d[0]["id"] == "gw-1");
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(2, &[("room1/temp", T0 + 1_000, 150.0)])]));
    let alert = stream.wait_for("alert", |d| d[0]["state"] == "firing");
    assert_eq!((alert.data[0]["sensor"].as_str(), alert.data[0]["rule"].as_str()), (Some("room1/temp"), Some("hot")));
    assert_eq!(agg.get("/api/v1/stream?sensor=room[").status, 400);
    assert_eq!(agg.get("/api/v1/stream?types=reading,gossip").status, 400);
}

#[test]
fn a_client_that_reconnects_gets_what_it_missed_or_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let first = open(agg.addr, "?types=reading", None);
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &[("s/a", T0, 1.0)])]));
    let seen = first.wait_for("reading", |d| has_reading(d, "s/a", 1.0));
    drop(first);
    // While it is away: two more commits.
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(1, &[("s/a", T0 + 1, 2.0)])]));
    agg.wait_processed();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(2, &[("s/a", T0 + 2, 3.0)])]));
    agg.wait_processed();
    let again = open(agg.addr, "?types=reading", Some(&seen.id));
    let missed = again.wait_for("reading", |d| has_reading(d, "s/a", 2.0));
    assert!(missed.id.parse::<u64>().unwrap() > seen.id.parse::<u64>().unwrap());
    again.wait_for("reading", |d| has_reading(d, "s/a", 3.0));
    let replayed: Vec<SseEvent> = again.drain(Duration::from_millis(500));
    assert!(!replayed.iter().any(|e| has_reading(&e.data, "s/a", 1.0)), "what it had seen came again: {replayed:?}");
    // An id from before the ring (or from another process): reload, then live events.
    let stale = open(agg.addr, "?types=reading", Some("5"));
    let reset = stale.wait_for("reset", |_| true);
    assert!(reset.data["next"].as_u64().is_some(), "{reset:?}");
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(3, &[("s/a", T0 + 3, 4.0)])]));
    stale.wait_for("reading", |d| has_reading(d, "s/a", 4.0));
}

/// The status line and headers of an answer.
struct Head {
    status: u16,
    content_type: String,
    content_length: usize,
}

/// Sends a stream request and reads the answer's head; the socket stays open, at the body.
fn request(addr: SocketAddr, query: &str, last_event_id: Option<&str>) -> (Head, BufReader<TcpStream>) {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut head = format!("GET /api/v1/stream{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
    if let Some(id) = last_event_id {
        head.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    head.push_str("\r\n");
    socket.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(socket);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap();
    let mut head = Head { status, content_type: String::new(), content_length: 0 };
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-type") {
                head.content_type = v.trim().to_string();
            } else if k.eq_ignore_ascii_case("content-length") {
                head.content_length = v.trim().parse().unwrap();
            }
        }
    }
    (head, reader)
}

/// A stream request without a reader thread: (status, the socket kept open, an error's body).
fn connect(addr: SocketAddr) -> (u16, BufReader<TcpStream>, String) {
    let (head, mut reader) = request(addr, "", None);
    let mut body = vec![0; head.content_length];
    std::io::Read::read_exact(&mut reader, &mut body).unwrap();
    (head.status, reader, String::from_utf8_lossy(&body).into_owned())
}

/// Sets this process's soft limit on open files (`None`: to the hard limit); children inherit it.
fn set_open_files(soft: Option<u64>) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = soft.unwrap_or(limit.rlim_max).min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(limit.rlim_max >= 2_100, "this test needs 2,100 open files; the hard limit is {}", limit.rlim_max);
}

#[test]
fn the_thousand_and_first_client_waits_for_a_place() {
    // The aggregator starts with the soft limit systemd gives services (1,024) and raises it
    // itself; the test process then raises its own for its sockets.
    set_open_files(Some(1_024));
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    set_open_files(None);
    // The default cap: 1,000 clients follow the stream at once.
    let mut clients: Vec<_> = (0..1_000)
        .map(|i| {
            let (status, socket, body) = connect(agg.addr);
            assert_eq!(status, 200, "client {i}: {body}");
            socket
        })
        .collect();
    let (status, _, body) = connect(agg.addr);
    assert_eq!(status, 503, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(error["detail"].as_str().unwrap().contains("max_stream_clients"), "{body}");
    // Health still answers.
    assert_eq!(agg.get("/healthz").status, 200);
    // One leaves: the next one gets its place.
    clients.pop();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let (status, socket, body) = connect(agg.addr);
        if status == 200 {
            clients.push(socket);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no place freed: {status} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn max_stream_clients_sets_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with_http(dir.path(), "max_stream_clients = 2\n", "");
    let first = connect(agg.addr);
    let second = connect(agg.addr);
    assert_eq!((first.0, second.0), (200, 200));
    let (status, _, body) = connect(agg.addr);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("2 clients are following the stream already"), "{body}");
}
