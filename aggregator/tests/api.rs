//! The read API and the service endpoints.

mod common;

use common::{Aggregator, T0, postcard_batch, steady};

#[test]
fn sensors_are_listed_sorted_with_their_latest_reading() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let (_, empty) = agg.get_json("/api/v1/sensors");
    assert_eq!(empty, serde_json::json!({"sensors": [], "next": null}));
    agg.ingest_ok(
        0,
        &postcard_batch("gw-1", 1, &[(0, &[("b/x", T0, 1.0), ("a/y", T0 + 5, 2.0), ("b/x", T0 + 9, 3.0)])]),
    );
    agg.wait_processed();
    let (status, sensors) = agg.get_json("/api/v1/sensors");
    assert_eq!(status, 200);
    let list = sensors["sensors"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["status"], "online");
    assert_eq!(list[0]["id"], "a/y");
    assert_eq!(list[1]["id"], "b/x");
    assert_eq!(list[1]["count"], 2);
    assert_eq!(list[1]["last_value"], 3.0);
    assert_eq!(list[1]["last_ts"], T0 + 9);
    let last_seen = list[1]["last_seen"].as_i64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    assert!(last_seen <= now && last_seen > now - 600_000, "last_seen {last_seen} is the receive time, now {now}");
}

#[test]
fn the_sensor_list_pages_by_id_with_a_prefix_and_caps_its_page() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let ids = ["a/1", "a/2", "a/3", "b/1", "ab"];
    let readings: Vec<(&str, i64, f64)> = ids.iter().map(|id| (*id, T0, 1.0)).collect();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    let ids_of = |v: &serde_json::Value| -> Vec<String> {
        v["sensors"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };
    let (_, first) = agg.get_json("/api/v1/sensors?limit=2");
    assert_eq!((ids_of(&first), first["next"].as_str()), (vec!["a/1".to_string(), "a/2".into()], Some("a/2")));
    let (_, second) = agg.get_json("/api/v1/sensors?limit=2&after=a%2F2");
    assert_eq!(ids_of(&second), ["a/3", "ab"]);
    let (_, last) = agg.get_json("/api/v1/sensors?limit=2&after=ab");
    assert_eq!((ids_of(&last), last["next"].is_null()), (vec!["b/1".to_string()], true));
    let (_, prefixed) = agg.get_json("/api/v1/sensors?prefix=a%2F");
    assert_eq!(ids_of(&prefixed), ["a/1", "a/2", "a/3"]);
    let too_many = agg.get("/api/v1/sensors?limit=10001");
    assert_eq!(too_many.status, 400);
    assert!(too_many.json()["detail"].as_str().unwrap().contains("10000"), "{}", too_many.text());
}

#[test]
fn agents_lists_every_configured_agent_seen_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s", T0, 7))]));
    agg.wait_processed();
    let (status, agents) = agg.get_json("/api/v1/agents");
    assert_eq!(status, 200);
    assert_eq!(agents[0]["id"], "gw-1");
    assert_eq!(agents[0]["readings"], 7);
    assert!(agents[0]["last_seen"].as_i64().is_some());
    assert_eq!(agents[1], serde_json::json!({"id": "gw-2", "last_seen": null, "readings": 0}));
}

#[test]
fn health_metrics_and_dashboard_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let health = agg.get("/healthz");
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));
    let metrics = agg.get("/metrics").text();
    for name in [
        "tributary_ingest_requests_total{status=\"200\"}",
        "tributary_ingest_readings_total{result=\"appended\"}",
        "tributary_ingest_readings_total{result=\"duplicate\"}",
        "tributary_ingest_gap_readings_total",
        "tributary_log_end_offset",
        "tributary_processor_offset",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
    let page = agg.get("/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap_or("").starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("/api/v1/sensors") && html.contains("/api/v1/agents"), "the page reads the API");
    assert!(!html.contains("http://") && !html.contains("https://"), "no CDN or external resource");
}
