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
    assert_eq!(agents[0]["state"], "online");
    assert_eq!(
        agents[1],
        serde_json::json!({"id": "gw-2", "state": "never_seen", "last_seen": null, "last_contact": null,
            "backlog_readings": null, "backlog_bytes": null, "readings": 0})
    );
}

#[test]
fn an_agent_with_a_backlog_is_catching_up_until_it_has_sent_it() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let send = |seq: u64, backlog: &str| {
        let headers = vec![
            ("Content-Type", "application/x-postcard".to_string()),
            ("Authorization", "Bearer secret-gw-1".to_string()),
            ("x-tributary-backlog", backlog.to_string()),
        ];
        let body = postcard_batch("gw-1", 1, &[(seq, &steady("s", T0 + seq as i64 * 1_000, 5))]);
        let r = common::http(agg.addr, "POST", "/api/v1/ingest", &headers, &body);
        assert_eq!(r.status, 200, "{}", r.text());
    };
    send(0, "readings=250000, bytes=4000000");
    let (_, agents) = agg.get_json("/api/v1/agents");
    assert_eq!(agents[0]["state"], "catching_up", "{agents}");
    assert_eq!(
        (agents[0]["backlog_readings"].as_u64(), agents[0]["backlog_bytes"].as_u64()),
        (Some(250_000), Some(4_000_000))
    );
    assert_eq!(agg.metric("tributary_agent_backlog_readings{agent=\"gw-1\"}"), 250_000.0);
    // A header that does not parse is ignored, not an error.
    send(5, "lots");
    assert_eq!(agg.get_json("/api/v1/agents").1[0]["backlog_readings"], serde_json::Value::Null);
    send(10, "readings=3, bytes=120");
    let (_, agents) = agg.get_json("/api/v1/agents");
    assert_eq!(agents[0]["state"], "online", "{agents}");
    assert_eq!(agents[0]["backlog_readings"], 3);
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
    // Everything the page loads is served by the aggregator itself (no CDN: works offline).
    for asset in ["/assets/app.js", "/assets/app.css", "/assets/uPlot.iife.min.js", "/assets/uPlot.min.css"] {
        assert!(html.contains(asset), "{asset} not in the page");
        let served = agg.get(asset);
        assert_eq!(served.status, 200, "{asset}");
        assert!(!served.text().contains("https://cdn"), "{asset} loads from a CDN");
    }
    assert!(!html.contains("http://") && !html.contains("https://"), "no CDN or external resource");
    let script = agg.get("/assets/app.js").text();
    assert!(script.contains("/api/v1/stream") && script.contains("/api/v1/agents"), "the page reads the API");
    assert!(agg.get("/assets/uPlot.LICENSE").text().contains("MIT"));
    assert_eq!(agg.get("/assets/nope.js").status, 404);
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

#[test]
fn a_series_has_every_bucket_with_nulls_where_nothing_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // Minutes 0 and 3 have readings; 1 and 2 are a gap a chart must not draw across.
    agg.ingest_ok(
        0,
        &postcard_batch(
            "gw-1",
            1,
            &[(
                0,
                &[
                    ("dev-1/temperature", T0, 1.0),
                    ("dev-1/temperature", T0 + 30_000, 3.0),
                    ("dev-1/temperature", T0 + 180_000, 10.0),
                ],
            )],
        ),
    );
    agg.wait_processed();
    let path = format!("/api/v1/sensors/dev-1/temperature/series?from={T0}&to={}&step=1m", T0 + 240_000);
    let (status, series) = agg.get_json(&path);
    assert_eq!(status, 200, "{series}");
    assert_eq!(series["sensor"], "dev-1/temperature");
    assert_eq!(series["step"], 60_000);
    assert_eq!(series["time"], serde_json::json!([T0, T0 + 60_000, T0 + 120_000, T0 + 180_000]));
    assert_eq!(series["mean"], serde_json::json!([2.0, null, null, 10.0]));
    assert_eq!(series["min"], serde_json::json!([1.0, null, null, 10.0]));
    assert_eq!(series["max"], serde_json::json!([3.0, null, null, 10.0]));
    assert_eq!(series["count"], serde_json::json!([2, 0, 0, 1]));
    // Percent-encoded id, other aggregates, a 5-minute step served from 1-minute windows.
    let path = format!("/api/v1/sensors/dev-1%2Ftemperature/series?from={T0}&to={}&step=5m&agg=p95,last", T0 + 300_000);
    let (status, series) = agg.get_json(&path);
    assert_eq!(status, 200, "{series}");
    assert_eq!(series["time"], serde_json::json!([T0]));
    assert_eq!(series["last"], serde_json::json!([10.0]));
    assert!(series["p95"][0].as_f64().is_some_and(|p| (3.0..=10.0).contains(&p)), "{series}");
    assert!(series.get("mean").is_none(), "only the aggregates asked for: {series}");
    // max_points picks the step; the answer never holds more buckets than asked.
    let path = format!("/api/v1/sensors/dev-1/temperature/series?from={T0}&to={}&max_points=2", T0 + 240_000);
    let (_, series) = agg.get_json(&path);
    assert_eq!(series["step"], 120_000, "{series}");
    assert_eq!(series["mean"], serde_json::json!([2.0, 10.0]));
    // CSV, by parameter and by Accept header, with ISO-8601 times and empty cells for gaps.
    let csv = agg.get(&format!(
        "/api/v1/sensors/dev-1/temperature/series?from={T0}&to={}&step=1m&agg=mean,count&format=csv",
        T0 + 120_000
    ));
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    assert_eq!(T0, 1_764_000_000_000);
    assert_eq!(csv.text(), "time,mean,count\n2025-11-24T16:00:00.000+00:00,2,2\n2025-11-24T16:01:00.000+00:00,,0\n");
    let by_accept = common::http(
        agg.addr,
        "GET",
        &format!("/api/v1/sensors/dev-1/temperature/series?from={T0}&to={}&step=1m&agg=mean,count", T0 + 120_000),
        &[("accept", "text/csv".to_string())],
        &[],
    );
    assert_eq!(by_accept.text(), csv.text());
}

#[test]
fn a_series_refuses_what_it_cannot_answer_whole() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s", T0, 1))]));
    agg.wait_processed();
    let year = 365 * 86_400_000i64;
    for (query, needle) in [
        (format!("from={}&to={T0}", T0 + 1), "before"),
        (format!("from={T0}&to={}&step=1m", T0 + year), "10000"),
        (format!("from={T0}&to={}&max_points=100000", T0 + 1), "10000"),
        (format!("from={T0}&to={}&step=7s", T0 + 1), "7s"),
        (format!("from={T0}&to={}&agg=avg", T0 + 1), "p95"),
        (format!("from={T0}&to={}&step=1m&max_points=5", T0 + 1), "not both"),
        (format!("from={T0}&to={}&format=xml", T0 + 1), "csv"),
    ] {
        let response = agg.get(&format!("/api/v1/sensors/s/series?{query}"));
        let body = response.json();
        assert_eq!((response.status, body["error"].as_str()), (400, Some("bad_request")), "{query}: {body}");
        assert!(body["detail"].as_str().is_some_and(|d| d.contains(needle)), "{query}: {body}");
    }
    // The widest valid range at the coarsest step is answered, not overflowed.
    let (status, body) =
        agg.get_json(&format!("/api/v1/sensors/s/series?from={}&to={}&max_points=10000", i64::MIN, i64::MAX));
    assert_eq!(status, 200, "{body}");
    assert!(body["time"].as_array().is_some_and(|t| !t.is_empty() && t.len() <= 10_000));
    let unknown = agg.get("/api/v1/sensors/nope/series");
    assert_eq!(unknown.status, 404);
}

#[test]
fn latest_answers_many_sensors_by_glob() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(
        0,
        &postcard_batch(
            "gw-1",
            1,
            &[(
                0,
                &[
                    ("room1/temp", T0, 20.5),
                    ("room1/hum", T0, 40.0),
                    ("room2/temp", T0 + 1, 19.0),
                    ("room1/temp", T0 + 2, 21.0),
                ],
            )],
        ),
    );
    agg.wait_processed();
    let (status, latest) = agg.get_json("/api/v1/latest?sensor=*/temp");
    assert_eq!(status, 200, "{latest}");
    let ids: Vec<&str> = latest.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["room1/temp", "room2/temp"]);
    assert_eq!(latest[0]["last_value"], 21.0);
    assert_eq!(latest[0]["last_ts"], T0 + 2);
    assert_eq!(latest[0]["status"], "online");
    let (_, all) = agg.get_json("/api/v1/latest");
    assert_eq!(all.as_array().map(Vec::len), Some(3));
    let bad = agg.get("/api/v1/latest?sensor=room[");
    assert_eq!(bad.status, 400, "{}", bad.text());
}

#[test]
fn a_read_token_guards_the_page_and_the_api_but_not_ingest_or_health() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with_http(dir.path(), "read_token = \"r3ad\"\n", "");
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &steady("s", T0, 1))]));
    agg.wait_processed();
    let bearer = |t: &str| vec![("authorization", format!("Bearer {t}"))];
    for path in ["/api/v1/sensors", "/api/v1/latest", "/api/v1/sensors/s/windows", "/api/v1/agents", "/api/v1/nothing"]
    {
        let refused = agg.get(path);
        assert_eq!(refused.status, 401, "{path}");
        assert_eq!(refused.json()["error"], "unauthorized", "{path}");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
        // An agent's ingest token is not a read token.
        let agent = common::http(agg.addr, "GET", path, &bearer("secret-gw-1"), &[]);
        assert_eq!(agent.status, 401, "{path}");
    }
    let allowed = common::http(agg.addr, "GET", "/api/v1/sensors", &bearer("r3ad"), &[]);
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.json()[0]["id"], "s");
    // The read token does not ingest.
    let ingest = common::http(agg.addr, "POST", "/api/v1/ingest", &bearer("r3ad"), b"x");
    assert_eq!(ingest.status, 401);
    assert_eq!(agg.get("/healthz").status, 200);
    assert_eq!(agg.get("/metrics").status, 200);
    // A browser: the page asks for the token, `/?token=` sets a cookie, the cookie reads.
    let page = agg.get("/");
    assert_eq!(page.status, 401);
    assert!(page.text().contains("read token"), "{}", page.text());
    assert_eq!(agg.get("/?token=wrong").status, 401);
    let login = agg.get("/?token=r3ad");
    assert_eq!((login.status, login.header("location")), (303, Some("/")));
    let cookie = login.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    let with_cookie = common::http(agg.addr, "GET", "/", &[("cookie", pair.clone())], &[]);
    assert_eq!(with_cookie.status, 200);
    let api = common::http(agg.addr, "GET", "/api/v1/latest", &[("cookie", format!("other=1; {pair}"))], &[]);
    assert_eq!(api.status, 200);
}

#[test]
fn every_answer_carries_security_headers_and_cors_is_per_origin() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with_http(dir.path(), "cors_origins = [\"https://grafana.example.com\"]\n", "");
    for path in ["/", "/api/v1/sensors", "/api/v1/nothing", "/healthz"] {
        let response = agg.get(path);
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"), "{path}");
        assert_eq!(response.header("x-frame-options"), Some("DENY"), "{path}");
        assert!(response.header("content-security-policy").is_some_and(|c| c.contains("default-src 'self'")), "{path}");
    }
    let preflight = |origin: &str| {
        common::http(
            agg.addr,
            "OPTIONS",
            "/api/v1/sensors",
            &[
                ("origin", origin.to_string()),
                ("access-control-request-method", "GET".to_string()),
                ("access-control-request-headers", "authorization".to_string()),
            ],
            &[],
        )
    };
    let allowed = preflight("https://grafana.example.com");
    assert_eq!(allowed.header("access-control-allow-origin"), Some("https://grafana.example.com"));
    let other = preflight("https://evil.example.net");
    assert_eq!(other.header("access-control-allow-origin"), None);
    let read =
        common::http(agg.addr, "GET", "/api/v1/sensors", &[("origin", "https://grafana.example.com".into())], &[]);
    assert_eq!((read.status, read.header("access-control-allow-origin")), (200, Some("https://grafana.example.com")));
}

#[test]
fn windows_come_as_csv_for_one_sensor_or_many_with_the_members_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let readings: Vec<(&str, i64, f64)> =
        (0..180).map(|i| (["a/x", "b,\"odd\"/y"][i % 2], T0 + i as i64 * 1_000, i as f64 / 2.0)).collect();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    let range = format!("from={T0}&to={}", T0 + 3_600_000);

    let json = agg.get_json(&format!("/api/v1/sensors/a%2Fx/windows?size=1m&{range}")).1;
    let csv = agg.get(&format!("/api/v1/sensors/a%2Fx/windows?size=1m&{range}&format=csv"));
    assert_eq!(csv.status, 200);
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    let text = csv.text();
    let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines[0],
        "sensor,start,end,count,min,max,mean,stddev,first_ts,first_value,last_ts,last_value,p50,p95,p99,revision,updated_at"
    );
    assert_eq!(lines.len() - 1, json.as_array().unwrap().len());
    let first: Vec<&str> = lines[1].split(',').collect();
    let w = &json[0];
    assert_eq!(first[0], "a/x");
    // Times are ISO-8601 with their offset; the rest as the JSON has them.
    let iso = |ms: &serde_json::Value| tributary_aggregator::series::iso8601(ms.as_i64().unwrap());
    assert_eq!(first[1], iso(&w["start"]));
    assert!(first[1].ends_with("+00:00") && first[1].contains('T'), "{}", first[1]);
    assert_eq!(first[2], iso(&w["end"]));
    assert_eq!(first[3], w["count"].to_string());
    assert_eq!(first[6].parse::<f64>().unwrap(), w["mean"].as_f64().unwrap());
    assert_eq!(first[8], iso(&w["first"]["ts"]));
    assert_eq!(first[15], w["revision"].to_string());
    assert_eq!(first[16], iso(&w["updated_at"]));

    // Accept: text/csv does the same; many sensors under one header, odd ids quoted.
    let headers = [("Accept", "text/csv".to_string())];
    let many = common::http(
        agg.addr,
        "GET",
        &format!("/api/v1/windows?sensor=*/*&size=1m&{range}&fields=start,count,mean"),
        &headers,
        &[],
    );
    assert_eq!(many.status, 200, "{}", many.text());
    let text = many.text();
    let lines: Vec<&str> = text.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines[0], "sensor,start,count,mean");
    assert!(lines.iter().any(|l| l.starts_with("\"b,\"\"odd\"\"/y\",")), "{text}");
    assert_eq!(lines.len() - 1, 6, "three minutes of two sensors: {text}");
    let counted: u64 = lines[1..].iter().map(|l| l.rsplit(',').nth(1).unwrap().parse::<u64>().unwrap()).sum();
    assert_eq!(counted, 180);

    let bad = agg.get("/api/v1/sensors/a%2Fx/windows?size=1m&format=xml");
    assert_eq!(bad.status, 400, "{}", bad.text());
}
