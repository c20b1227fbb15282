//! The real `tributary-sim load` binary against a small ingest endpoint on loopback that decodes
//! every batch the way the aggregator does.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tributary_shared::batch::POSTCARD_CONTENT_TYPE;
use tributary_shared::{Batch, IngestAck};

const TOKEN: &str = "secret-gw-7";

/// How the endpoint answers.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Accept,
    Unauthorized,
    AcceptOneLess,
}

/// One received block: (first_seq, count) in arrival order, per epoch.
#[derive(Debug, Default)]
struct Received {
    agents: BTreeSet<String>,
    epochs: BTreeMap<u64, Vec<(u64, u64)>>,
    sensors: BTreeSet<String>,
    readings: u64,
    batches: u64,
    latest_ts: i64,
    earliest_ts: Option<i64>,
}

#[derive(Clone)]
struct Endpoint {
    behaviour: Behaviour,
    received: Arc<Mutex<Received>>,
}

async fn ingest(State(endpoint): State<Endpoint>, headers: HeaderMap, body: Bytes) -> Response {
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) || matches!(endpoint.behaviour, Behaviour::Unauthorized) {
        return (StatusCode::UNAUTHORIZED, "unknown agent or wrong token").into_response();
    }
    if headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) != Some(POSTCARD_CONTENT_TYPE) {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "postcard only").into_response();
    }
    let batch = match Batch::from_postcard(&body) {
        Ok(batch) => batch,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut accepted = 0;
    let mut next_seq = 0;
    {
        let mut received = endpoint.received.lock().unwrap();
        received.agents.insert(batch.agent_id.to_string());
        received.batches += 1;
        for wire in &batch.blocks {
            let block = match wire.decode() {
                Ok(block) => block,
                Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
            };
            block.validate().unwrap();
            received.sensors.extend(block.sensors.iter().cloned());
            for (_, ts, _) in block.readings() {
                received.latest_ts = received.latest_ts.max(ts);
                received.earliest_ts = Some(received.earliest_ts.map_or(ts, |e| e.min(ts)));
            }
            received.epochs.entry(batch.epoch).or_default().push((wire.first_seq, u64::from(wire.count)));
            received.readings += block.len() as u64;
            accepted += block.len() as u64;
            next_seq = wire.first_seq + u64::from(wire.count);
        }
    }
    if matches!(endpoint.behaviour, Behaviour::AcceptOneLess) {
        accepted -= 1;
    }
    axum::Json(IngestAck { accepted, duplicates: 0, next_seq, missing: 0 }).into_response()
}

/// Serves `/api/v1/ingest` on a loopback port; returns the base URL and what it received.
async fn serve(behaviour: Behaviour) -> (String, Arc<Mutex<Received>>) {
    let received = Arc::new(Mutex::new(Received::default()));
    let app = Router::new()
        .route("/api/v1/ingest", post(ingest))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(Endpoint { behaviour, received: received.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

async fn load(url: &str, extra: &[&str]) -> Output {
    let mut args: Vec<String> = ["load", "--url", url, "--token", TOKEN, "--agent-id", "gw-7"].map(String::from).into();
    args.extend(extra.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || Command::new(env!("CARGO_BIN_EXE_tributary-sim")).args(args).output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_arrives_once_in_contiguous_ordered_epochs() {
    let (url, received) = serve(Behaviour::Accept).await;
    let flags =
        ["--readings", "20000", "--block", "1000", "--blocks-per-batch", "3", "--connections", "3", "--sensors", "10"];
    let output = load(&url, &flags).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let line = String::from_utf8_lossy(&output.stdout);
    assert!(line.starts_with("ingested 20000 readings in "), "{line}");
    assert!(line.contains("(7 batches, "), "{line}"); // 20 blocks in batches of 3

    let received = received.lock().unwrap();
    assert_eq!(received.readings, 20_000);
    assert_eq!(received.batches, 7);
    assert_eq!(received.agents, BTreeSet::from(["gw-7".to_string()]));
    assert_eq!(received.sensors.len(), 10);
    assert_eq!(received.epochs.len(), 3, "one epoch per connection");
    for (epoch, blocks) in &received.epochs {
        let mut next = 0;
        for &(first_seq, count) in blocks {
            assert_eq!(first_seq, next, "epoch {epoch:016x}: gap or reordering in {blocks:?}");
            next += count;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_fails_the_run_with_the_servers_reason() {
    let (url, _) = serve(Behaviour::Unauthorized).await;
    let output = load(&url, &["--readings", "3000", "--block", "1000", "--connections", "2"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("401") && stderr.contains("unknown agent or wrong token"), "{stderr}");
    assert!(output.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_that_falls_short_fails_the_run() {
    let (url, _) = serve(Behaviour::AcceptOneLess).await;
    let output = load(&url, &["--readings", "3000", "--block", "1000", "--connections", "1"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("accepted 2999 of the 3000 readings"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_aggregator_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let output = load(&format!("http://127.0.0.1:{port}"), &["--readings", "100"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("POST http://127.0.0.1:{port}/api/v1/ingest")), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_run_keeps_to_its_rate_and_ends_its_event_times_in_the_past() {
    let (url, received) = serve(Behaviour::Accept).await;
    // 2 connections of 3 batches of 1,000 at 4,000 readings/s in all: each connection's last
    // batch is due 1,000 ms after its first, however fast the endpoint answers.
    let flags = [
        "--readings",
        "6000",
        "--block",
        "1000",
        "--blocks-per-batch",
        "1",
        "--connections",
        "2",
        "--sensors",
        "10",
        "--rate",
        "4000",
        "--ago-s",
        "7200",
    ];
    let started = std::time::Instant::now();
    let output = load(&url, &flags).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(started.elapsed() >= std::time::Duration::from_millis(1000), "{:?}", started.elapsed());
    let received = received.lock().unwrap();
    assert_eq!(received.readings, 6000);
    let two_hours_ago =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 - 7_200_000;
    assert!(received.latest_ts <= two_hours_ago + 10, "{} is after {two_hours_ago}", received.latest_ts);
    assert!(received.latest_ts > two_hours_ago - 60_000, "{}", received.latest_ts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_period_sets_how_much_event_time_a_run_covers() {
    let (url, received) = serve(Behaviour::Accept).await;
    // 10 sensors, 6,000 readings: 600 periods. Of 10 ms, 6 s of event time (of the default
    // second, 10 minutes).
    let flags = ["--readings", "6000", "--sensors", "10", "--period-ms", "10"];
    let output = load(&url, &flags).await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let received = received.lock().unwrap();
    assert_eq!(received.readings, 6000);
    let span = received.latest_ts - received.earliest_ts.unwrap();
    assert!((5_980..=6_000).contains(&span), "600 periods of 10 ms span {span} ms");
}
