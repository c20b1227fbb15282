//! The read API and the service endpoints.

mod common;

use common::{Aggregator, Response, T0, postcard_batch, steady};

#[test]
fn sensors_are_listed_sorted_with_their_latest_reading() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let (_, empty) = agg.get_json("/api/v1/sensors");
    assert_eq!(empty, serde_json::json!([]));
    agg.ingest_ok(
        0,
        &postcard_batch("gw-1", 1, &[(0, &[("b/x", T0, 1.0), ("a/y", T0 + 5, 2.0), ("b/x", T0 + 9, 3.0)])]),
    );
    agg.wait_processed();
    let (status, sensors) = agg.get_json("/api/v1/sensors");
    assert_eq!(status, 200);
    let list = sensors.as_array().unwrap();
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
        "tributary_processor_lag_readings 0",
        "tributary_processor_stalled 0",
        "tributary_processor_step_failures_total 0",
        "tributary_processor_set_aside_blocks_total 0",
        "tributary_processor_set_aside_readings_total 0",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
    let page = agg.get("/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap_or("").starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("/api/v1/sensors") && html.contains("/api/v1/agents"), "the page reads the API");
    assert!(!html.contains("http://") && !html.contains("https://"), "no CDN or external resource");
    // Browsers ask for the icon on every load: it is served, not a 404 in every log.
    assert!(html.contains(r#"rel="icon""#));
    let icon = agg.get("/favicon.ico");
    assert_eq!(icon.status, 200);
    assert_eq!(icon.header("content-type"), Some("image/svg+xml"));
    assert!(icon.text().starts_with("<svg"));
}

/// The `rel="next"` URL of a `Link` header, if any.
fn next_link(response: &Response) -> Option<String> {
    let link = response.header("link")?;
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    Some(link.trim_start_matches('<').split('>').next()?.to_string())
}

/// Follows `Link: rel="next"` from `path`: every id, and the size of each page.
fn all_pages(agg: &Aggregator, path: &str) -> (Vec<String>, Vec<usize>) {
    let (mut ids, mut pages) = (Vec::new(), Vec::new());
    let mut next = Some(path.to_string());
    while let Some(path) = next {
        let response = agg.get(&path);
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        let page = response.json();
        let page = page.as_array().unwrap();
        pages.push(page.len());
        ids.extend(page.iter().map(|s| s["id"].as_str().unwrap().to_string()));
        next = next_link(&response);
        assert!(pages.len() < 100, "the cursor does not advance");
    }
    (ids, pages)
}

#[test]
fn sensors_come_in_pages_with_a_cursor_and_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let mut readings: Vec<(String, i64, f64)> = (0..25).map(|i| (format!("p/{i:02}"), T0, i as f64)).collect();
    readings.extend((0..5).map(|i| (format!("q/{i} x&y"), T0, i as f64)));
    let readings: Vec<(&str, i64, f64)> = readings.iter().map(|(s, t, v)| (s.as_str(), *t, *v)).collect();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    let mut expected: Vec<String> = readings.iter().map(|r| r.0.to_string()).collect();
    expected.sort();

    let (ids, pages) = all_pages(&agg, "/api/v1/sensors?limit=10");
    assert_eq!((ids, pages), (expected.clone(), vec![10, 10, 10]));
    let unpaged = agg.get("/api/v1/sensors");
    assert_eq!(unpaged.json().as_array().unwrap().len(), 30, "the default page holds them all");
    assert_eq!(unpaged.header("link"), None);

    let (ids, pages) = all_pages(&agg, "/api/v1/sensors?limit=7&prefix=p%2F");
    assert_eq!((ids, pages), (expected[..25].to_vec(), vec![7, 7, 7, 4]));
    let (ids, _) = all_pages(&agg, "/api/v1/sensors?prefix=q%2F&limit=2");
    assert_eq!(ids, expected[25..].to_vec(), "ids with spaces and & survive the cursor");
    let (ids, _) = all_pages(&agg, "/api/v1/sensors?after=p%2F20&limit=3");
    assert_eq!(ids, expected[21..].to_vec());
    let (ids, _) = all_pages(&agg, "/api/v1/sensors?prefix=nothing");
    assert!(ids.is_empty());

    for bad in ["limit=10001", "limit=0", "limit=many"] {
        let response = agg.get(&format!("/api/v1/sensors?{bad}"));
        assert_eq!(response.status, 400, "{bad}");
        let error = response.json();
        assert_eq!(error["error"], "bad_request");
        assert!(error["detail"].as_str().unwrap().contains("10000"), "{bad}: the cap is named: {error}");
    }
    let unknown = agg.get("/api/v1/sensors?page=2");
    assert_eq!((unknown.status, unknown.json()["error"].as_str()), (400, Some("bad_request")));
}

#[test]
fn api_errors_are_json_with_a_code_and_a_detail() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s", T0, 1))]));
    agg.wait_processed();
    for (method, path, status, code) in [
        ("GET", "/api/v1/sensors/nope", 404, "not_found"),
        ("GET", "/api/v1/sensors/nope/windows", 404, "not_found"),
        ("GET", "/api/v1/nothing-here", 404, "not_found"),
        ("GET", "/api/v1/sensors/s/windows?size=7s", 400, "bad_request"),
        ("GET", "/api/v1/sensors/s/windows?from=soon", 400, "bad_request"),
        ("GET", "/api/v1/set-aside?after=x", 400, "bad_request"),
        ("DELETE", "/api/v1/sensors", 405, "method_not_allowed"),
    ] {
        let response = common::http(agg.addr, method, path, &[], &[]);
        assert_eq!(response.status, status, "{method} {path}: {}", response.text());
        let body = response.json();
        assert_eq!(body["error"], code, "{method} {path}: {body}");
        assert!(body["detail"].as_str().is_some_and(|d| d.len() > 10), "{method} {path}: {body}");
    }
    let (status, set_aside) = agg.get_json("/api/v1/set-aside");
    assert_eq!((status, set_aside), (200, serde_json::json!([])));
}
