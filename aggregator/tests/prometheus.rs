//! The Prometheus HTTP API subset, with the requests Grafana's Prometheus data source sends (form
//! POSTs of query_range and query, label and series look-ups, buildinfo), against the real binary.

mod common;

use common::{Aggregator, T0, postcard_batch};

fn form(agg: &Aggregator, path: &str, body: &str) -> (u16, serde_json::Value) {
    let response = common::http(
        agg.addr,
        "POST",
        path,
        &[("content-type", "application/x-www-form-urlencoded".to_string())],
        body.as_bytes(),
    );
    (response.status, response.json())
}

fn enc(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Two sensors; room1/temp has readings 1, 2, 3 in minute 0, 10 in minute 1, nothing in minute 2,
/// 5 in minute 3.
fn fed() -> (tempfile::TempDir, Aggregator) {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let readings = [
        ("room1/temp", T0, 1.0),
        ("room1/temp", T0 + 10_000, 2.0),
        ("room1/temp", T0 + 20_000, 3.0),
        ("room1/temp", T0 + 60_000, 10.0),
        ("room1/temp", T0 + 180_000, 5.0),
        ("room2/temp", T0 + 5_000, 7.0),
    ];
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    (dir, agg)
}

#[test]
fn grafana_range_queries_are_answered_from_the_windows() {
    let (_dir, agg) = fed();
    let s = |ms: i64| (ms / 1000).to_string();
    // avg_over_time over 1-minute steps: the samples at t cover [t - 1m, t).
    let query = enc(r#"avg_over_time(tributary_reading{sensor="room1/temp"}[1m])"#);
    let body = format!("query={query}&start={}&end={}&step=60", s(T0 + 60_000), s(T0 + 240_000));
    let (status, answer) = form(&agg, "/prometheus/api/v1/query_range", &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "success");
    assert_eq!(answer["data"]["resultType"], "matrix");
    let result = answer["data"]["result"].as_array().unwrap();
    assert_eq!(result.len(), 1, "{answer}");
    assert_eq!(result[0]["metric"], serde_json::json!({"sensor": "room1/temp"}));
    let t = |ms: i64| serde_json::json!(ms as f64 / 1000.0);
    // Minute 2 had nothing: no sample at T0 + 3m (a gap, as Prometheus leaves it).
    assert_eq!(
        result[0]["values"],
        serde_json::json!([[t(T0 + 60_000), "2"], [t(T0 + 120_000), "10"], [t(T0 + 240_000), "5"]])
    );
    // Regex matchers (anchored), max and count over 5 minutes, GET as well as POST.
    let query = enc(r#"max_over_time(tributary_reading{sensor=~"room.*"}[5m])"#);
    let (status, answer) = agg.get_json(&format!(
        "/prometheus/api/v1/query_range?query={query}&start={}&end={}&step=300",
        s(T0 + 300_000),
        s(T0 + 300_000)
    ));
    assert_eq!(status, 200, "{answer}");
    let result = answer["data"]["result"].as_array().unwrap();
    let by_sensor: Vec<(&str, &str)> =
        result.iter().map(|r| (r["metric"]["sensor"].as_str().unwrap(), r["values"][0][1].as_str().unwrap())).collect();
    assert_eq!(by_sensor, [("room1/temp", "10"), ("room2/temp", "7")]);
    let query = enc(r#"count_over_time(tributary_reading{sensor="room1/temp"}[5m])"#);
    let (_, answer) = form(
        &agg,
        "/prometheus/api/v1/query_range",
        &format!("query={query}&start={}&end={}&step=300", s(T0 + 300_000), s(T0 + 300_000)),
    );
    assert_eq!(answer["data"]["result"][0]["values"][0][1], "5");
    let query = enc(r#"quantile_over_time(0.5, tributary_reading{sensor="room1/temp"}[1m])"#);
    let (_, answer) = form(
        &agg,
        "/prometheus/api/v1/query_range",
        &format!("query={query}&start={}&end={}&step=60", s(T0 + 60_000), s(T0 + 60_000)),
    );
    let median: f64 = answer["data"]["result"][0]["values"][0][1].as_str().unwrap().parse().unwrap();
    assert!((median - 2.0).abs() < 0.05, "{answer}");
    // A bare selector: the last reading within the 5-minute lookback, with the metric name.
    let query = enc(r#"tributary_reading{sensor="room1/temp"}"#);
    let (_, answer) = form(
        &agg,
        "/prometheus/api/v1/query_range",
        &format!("query={query}&start={}&end={}&step=60", s(T0 + 120_000), s(T0 + 120_000)),
    );
    assert_eq!(answer["data"]["result"][0]["metric"]["__name__"], "tributary_reading");
    assert_eq!(answer["data"]["result"][0]["values"][0][1], "10");
}

#[test]
fn grafana_lookups_and_instant_queries_answer_in_prometheus_shapes() {
    let (_dir, agg) = fed();
    let (status, info) = agg.get_json("/prometheus/api/v1/status/buildinfo");
    assert_eq!((status, info["status"].as_str()), (200, Some("success")));
    assert!(info["data"]["version"].as_str().is_some());
    let (_, labels) = form(&agg, "/prometheus/api/v1/labels", "start=1&end=2");
    assert_eq!(labels["data"], serde_json::json!(["__name__", "sensor"]));
    let (_, names) = agg.get_json("/prometheus/api/v1/label/__name__/values");
    assert_eq!(names["data"], serde_json::json!(["tributary_reading"]));
    let (_, sensors) = agg.get_json("/prometheus/api/v1/label/sensor/values");
    assert_eq!(sensors["data"], serde_json::json!(["room1/temp", "room2/temp"]));
    let (_, series) = form(&agg, "/prometheus/api/v1/series", &format!("match[]={}", enc(r#"{sensor=~"room2.*"}"#)));
    assert_eq!(series["data"], serde_json::json!([{"__name__": "tributary_reading", "sensor": "room2/temp"}]));
    let query = enc(r#"tributary_reading{sensor="room1/temp"}"#);
    let (status, instant) =
        form(&agg, "/prometheus/api/v1/query", &format!("query={query}&time={}", (T0 + 190_000) / 1000));
    assert_eq!(status, 200, "{instant}");
    assert_eq!(instant["data"]["resultType"], "vector");
    assert_eq!(instant["data"]["result"][0]["value"][1], "5", "{instant}");
}

#[test]
fn what_cannot_be_answered_exactly_is_a_prometheus_error() {
    let (_dir, agg) = fed();
    for (query, step, needle) in [
        ("rate(tributary_reading[5m])", "60", "not supported"),
        (r#"avg_over_time(tributary_reading{sensor="room1/temp"}[95s])"#, "60", "multiples of a stored window size"),
        (r#"avg_over_time(tributary_reading{sensor="room1/temp"}[1m])"#, "7", "multiples"),
        (r#"avg_over_time(tributary_reading{sensor=~"("}[1m])"#, "60", "regular expression"),
        (r#"avg_over_time(tributary_reading{sensor="room1/temp"}[1m])"#, "0.001", "11000"),
        // 173 days of 1-minute windows behind every point: bounded work, refused.
        (r#"avg_over_time(tributary_reading{sensor="room1/temp"}[250001m])"#, "60", "more than 200000"),
    ] {
        let body = format!("query={}&start={}&end={}&step={step}", enc(query), T0 / 1000, (T0 + 3_600_000) / 1000);
        let (status, answer) = form(&agg, "/prometheus/api/v1/query_range", &body);
        assert_eq!(
            (status, answer["status"].as_str(), answer["errorType"].as_str()),
            (400, Some("error"), Some("bad_data")),
            "{query}: {answer}"
        );
        assert!(answer["error"].as_str().is_some_and(|e| e.contains(needle)), "{query}: {answer}");
    }
    let (status, answer) = form(&agg, "/prometheus/api/v1/query_range", "query=tributary_reading");
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("start"), "{answer}");
}
