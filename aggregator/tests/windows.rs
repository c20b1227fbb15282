//! Late data lands in the windows of its own event time; the latest value follows event time.

mod common;

use common::{Aggregator, T0, postcard_batch};
use serde_json::{Value, json};

/// The fields these tests check of each window.
fn summary(windows: &Value) -> Value {
    Value::Array(
        windows
            .as_array()
            .unwrap()
            .iter()
            .map(|w| json!({"start": w["start"], "end": w["end"], "count": w["count"], "min": w["min"], "max": w["max"], "mean": w["mean"]}))
            .collect(),
    )
}

const M: i64 = 60_000;

#[test]
fn late_readings_land_in_their_own_minute_and_five_minute_windows() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // First the present (minutes 5 and 6), then a backlog from minutes 0..2 arriving late.
    agg.ingest_ok(
        0,
        &postcard_batch("gw-1", 1, &[(0, &[("room1/temp", T0 + 5 * M + 1, 20.0), ("room1/temp", T0 + 6 * M, 22.0)])]),
    );
    agg.ingest_ok(
        0,
        &postcard_batch(
            "gw-1",
            1,
            &[(
                2,
                &[
                    ("room1/temp", T0, 10.0),
                    ("room1/temp", T0 + 30_000, 14.0),
                    ("room1/temp", T0 + M - 1, 12.0),
                    ("room1/temp", T0 + 2 * M + 500, -3.0),
                ],
            )],
        ),
    );
    agg.wait_processed();
    let (status, minutes) = agg.get_json("/api/v1/sensors/room1%2Ftemp/windows?size=1m");
    assert_eq!(status, 200);
    assert_eq!(
        summary(&minutes),
        json!([
            {"start": T0, "end": T0 + M, "count": 3, "min": 10.0, "max": 14.0, "mean": 12.0},
            {"start": T0 + 2 * M, "end": T0 + 3 * M, "count": 1, "min": -3.0, "max": -3.0, "mean": -3.0},
            {"start": T0 + 5 * M, "end": T0 + 6 * M, "count": 1, "min": 20.0, "max": 20.0, "mean": 20.0},
            {"start": T0 + 6 * M, "end": T0 + 7 * M, "count": 1, "min": 22.0, "max": 22.0, "mean": 22.0},
        ])
    );
    let (_, five) = agg.get_json("/api/v1/sensors/room1%2Ftemp/windows?size=5m");
    assert_eq!(
        summary(&five),
        json!([
            {"start": T0, "end": T0 + 5 * M, "count": 4, "min": -3.0, "max": 14.0, "mean": 33.0 / 4.0},
            {"start": T0 + 5 * M, "end": T0 + 10 * M, "count": 2, "min": 20.0, "max": 22.0, "mean": 21.0},
        ])
    );
    // from <= start < to, on whole windows.
    let (_, ranged) = agg.get_json(&format!("/api/v1/sensors/room1%2Ftemp/windows?from={}&to={}", T0 + M, T0 + 6 * M));
    let starts: Vec<i64> = ranged.as_array().unwrap().iter().map(|w| w["start"].as_i64().unwrap()).collect();
    assert_eq!(starts, [T0 + 2 * M, T0 + 5 * M]);
    let (_, partial) = agg.get_json(&format!("/api/v1/sensors/room1%2Ftemp/windows?size=5m&from={}", T0 + M));
    assert_eq!(partial.as_array().unwrap().len(), 1, "the window starting before `from` is left out: {partial}");

    // The latest value is the greatest event time, not the last to arrive.
    let (_, sensor) = agg.get_json("/api/v1/sensors/room1%2Ftemp");
    assert_eq!((sensor["last_ts"].as_i64(), sensor["last_value"].as_f64()), (Some(T0 + 6 * M), Some(22.0)));
    assert_eq!(sensor["count"], 6);
}

#[test]
fn window_sizes_must_be_stored_sizes_or_their_multiples() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &[("a", T0, 1.0)])]));
    agg.wait_processed();
    for size in ["10s", "90s", "1m", "5m", "1h", "1d", "2d"] {
        assert_eq!(agg.get(&format!("/api/v1/sensors/a/windows?size={size}")).status, 200, "{size}");
    }
    for size in ["15s", "1500ms", "0m", "often", "day"] {
        let response = agg.get(&format!("/api/v1/sensors/a/windows?size={size}"));
        assert_eq!(response.status, 400, "{size}");
        let error = response.json();
        assert_eq!(error["error"], "bad_request");
        assert!(error["detail"].as_str().unwrap().contains("size"), "{}", response.text());
    }
    assert_eq!(agg.get("/api/v1/sensors/a/windows?from=yesterday").status, 400);
    let (status, all) = agg.get_json("/api/v1/sensors/a/windows?size=&from=&to=");
    assert_eq!((status, all[0]["count"].as_u64()), (200, Some(1)), "empty parameters mean defaults");
    assert_eq!(agg.get("/api/v1/sensors/nope/windows").status, 404);
}

#[test]
fn percent_encoded_slashes_stay_inside_the_sensor_id() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &[("site/room 1/temp", T0, 1.5), ("site", T0, 9.0)])]));
    agg.wait_processed();
    let (status, sensor) = agg.get_json("/api/v1/sensors/site%2Froom%201%2Ftemp");
    assert_eq!(status, 200);
    assert_eq!((sensor["id"].as_str(), sensor["last_value"].as_f64()), (Some("site/room 1/temp"), Some(1.5)));
    let (status, windows) = agg.get_json("/api/v1/sensors/site%2Froom%201%2Ftemp/windows");
    assert_eq!(status, 200);
    assert_eq!(windows[0]["count"], 1);
    assert_eq!(windows[0]["mean"], 1.5);
    let (status, error) = agg.get_json("/api/v1/sensors/site%2Fnope");
    assert_eq!(status, 404);
    assert_eq!(error["error"], "not_found");
    assert!(error["detail"].as_str().unwrap().contains("site/nope"));
}

#[test]
fn any_i64_range_gets_a_clean_answer() {
    // The binary under test is a debug build, where an overflowing `start + size` would panic.
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &[("a", T0, 1.0), ("a", T0 + M, 3.0)])]));
    agg.wait_processed();
    let (min, max) = (i64::MIN, i64::MAX);
    for (query, windows) in [
        (format!("size=1d&from={min}&to={max}"), 1),
        (format!("size=1m&from={min}&to={max}"), 2),
        (format!("size=1d&from={min}"), 1),
        (format!("size=1d&to={max}"), 1),
        (format!("size=1h&from={}&to={max}", max - 1), 0),
        (format!("from={max}&to={max}"), 0),
        (format!("from={min}&to={min}"), 0),
        (format!("from={min}&to={}", min + 1), 0),
        (format!("size=1d&from={}&to={}", T0, T0 + 1), if T0 % 86_400_000 == 0 { 1 } else { 0 }),
        (format!("from={}&to={}", T0 + 1, T0 + M + 1), 1),
    ] {
        let response = agg.get(&format!("/api/v1/sensors/a/windows?{query}"));
        assert_eq!(response.status, 200, "{query}: {}", response.text());
        let list = response.json();
        assert_eq!(list.as_array().map(Vec::len), Some(windows), "{query}: {list}");
        for w in list.as_array().unwrap() {
            assert!(w["end"].as_i64() > w["start"].as_i64(), "{query}: {w}");
        }
    }
    let (status, whole) = agg.get_json(&format!("/api/v1/sensors/a/windows?size=1d&from={min}&to={max}"));
    assert_eq!((status, whole[0]["count"].as_u64(), whole[0]["mean"].as_f64()), (200, Some(2), Some(2.0)));

    let backwards = agg.get(&format!("/api/v1/sensors/a/windows?from={}&to={}", T0 + M, T0));
    assert_eq!(backwards.status, 400, "{}", backwards.text());
    let error = backwards.json();
    assert_eq!(error["error"], "bad_request");
    assert!(error["detail"].as_str().unwrap().contains("is after to"), "{error}");
    for overflowing in ["from=9223372036854775808", "to=-9223372036854775809", "from=1e3"] {
        let response = agg.get(&format!("/api/v1/sensors/a/windows?{overflowing}"));
        assert_eq!(response.status, 400, "{overflowing}: {}", response.text());
        assert!(response.json()["detail"].as_str().unwrap().contains("Unix time"), "{}", response.text());
    }
    assert_eq!(agg.get("/healthz").status, 200, "nothing panicked");
}

#[test]
fn a_request_for_more_windows_than_the_cap_is_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // One reading a minute for 10,001 minutes: one more 1-minute window than a request may return.
    let readings: Vec<(&str, i64, f64)> = (0..10_001).map(|i| ("busy", T0 + i * M, i as f64)).collect();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();

    let response = agg.get("/api/v1/sensors/busy/windows?size=1m");
    assert_eq!(response.status, 400, "{}", response.text());
    let error = response.json();
    assert_eq!(error["error"], "bad_request");
    let detail = error["detail"].as_str().unwrap();
    assert!(detail.contains("10000") && detail.contains("larger size") && detail.contains("from/to"), "{detail}");

    let (status, hourly) = agg.get_json("/api/v1/sensors/busy/windows?size=1h");
    assert_eq!(status, 200);
    let hourly = hourly.as_array().unwrap();
    assert_eq!(hourly.iter().map(|w| w["count"].as_u64().unwrap()).sum::<u64>(), 10_001);
    // The cap itself is allowed: exactly 10,000 windows.
    let (status, capped) = agg.get_json(&format!("/api/v1/sensors/busy/windows?from={T0}&to={}", T0 + 10_000 * M));
    assert_eq!((status, capped.as_array().map(Vec::len)), (200, Some(10_000)));
    assert_eq!(capped[9_999]["mean"], 9_999.0);
}
