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
        assert_eq!(response.json()["error"], "bad_request", "{}", response.text());
        assert!(response.json()["detail"].as_str().unwrap().contains("size"), "{}", response.text());
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
    assert!(error["detail"].as_str().unwrap().contains("site/nope"));
}
