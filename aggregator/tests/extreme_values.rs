//! Any finite value is accepted, so windows must stay finite and correct for all of them, through
//! merges across processor steps, every window size and a crash.

mod common;

use common::{Aggregator, T0};
use serde_json::{Value, json};

const M: i64 = 60_000;

/// POSTs one JSON batch (the format scripts use) as agent gw-1: one block from `first_seq`.
fn ingest_json(agg: &Aggregator, first_seq: u64, readings: &[(&str, i64, f64)]) {
    let readings: Vec<Value> = readings.iter().map(|(s, ts, v)| json!({"sensor": s, "ts": ts, "value": v})).collect();
    let body = json!({"agent_id": "gw-1", "epoch": 7, "blocks": [{"first_seq": first_seq, "readings": readings}]});
    let response = agg.ingest(Some(common::AGENTS[0].1), "application/json", body.to_string().as_bytes());
    assert_eq!(response.status, 200, "{}", response.text());
}

fn windows(agg: &Aggregator, sensor: &str, size: &str) -> Value {
    let (status, windows) = agg.get_json(&format!("/api/v1/sensors/{sensor}/windows?size={size}"));
    assert_eq!(status, 200, "{windows}");
    windows
}

/// Every window of `sensor` in every size: finite, mean within [min, max].
fn all_sizes(agg: &Aggregator, sensor: &str) -> Vec<Value> {
    ["1m", "5m", "1h", "1d"]
        .iter()
        .map(|size| {
            let list = windows(agg, sensor, size);
            for w in list.as_array().unwrap() {
                let (min, max, mean) = (w["min"].as_f64(), w["max"].as_f64(), w["mean"].as_f64());
                let (Some(min), Some(max), Some(mean)) = (min, max, mean) else {
                    panic!("{sensor} {size}: a field is not a number: {w}");
                };
                assert!(min <= mean && mean <= max, "{sensor} {size}: {w}");
            }
            list
        })
        .collect()
}

#[test]
fn opposite_readings_near_the_float_limit_give_a_zero_mean_in_every_window_size() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // As reported: two readings of 1e308, then two of -1e308, in one minute, in separate batches
    // so they meet in the store (a sum there went inf, then inf + -inf = NaN, and the commit
    // failed for ever).
    ingest_json(&agg, 0, &[("big", T0 + 1_000, 1e308), ("big", T0 + 2_000, 1e308)]);
    agg.wait_processed();
    ingest_json(&agg, 2, &[("big", T0 + 3_000, -1e308), ("big", T0 + 4_000, -1e308)]);
    // And all four in one block, meeting in the processor's memory.
    ingest_json(
        &agg,
        4,
        &[("one", T0, 1e308), ("one", T0 + 1, 1e308), ("one", T0 + 2, -1e308), ("one", T0 + 3, -1e308)],
    );
    agg.wait_processed();

    for sensor in ["big", "one"] {
        for (size, list) in ["1m", "5m", "1h", "1d"].iter().zip(all_sizes(&agg, sensor)) {
            assert_eq!(list.as_array().map(Vec::len), Some(1), "{sensor} {size}: {list}");
            let w = &list[0];
            assert_eq!(
                (&w["count"], &w["min"], &w["max"], &w["mean"]),
                (&json!(4), &json!(-1e308), &json!(1e308), &json!(0.0)),
                "{sensor} {size}: {w}"
            );
        }
    }
    assert_eq!(agg.get("/healthz").status, 200);
    assert_eq!(agg.metric("tributary_processor_step_failures_total"), 0.0);

    // A crash and a restart serve the same windows.
    let before: Vec<Vec<Value>> = ["big", "one"].iter().map(|s| all_sizes(&agg, s)).collect();
    agg.kill();
    let agg = Aggregator::start(dir.path());
    agg.wait_processed();
    let after: Vec<Vec<Value>> = ["big", "one"].iter().map(|s| all_sizes(&agg, s)).collect();
    assert_eq!(before, after);
}

#[test]
fn float_extremes_mixed_give_finite_windows_close_to_the_exact_mean() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let (max, tiny, sub) = (f64::MAX, f64::MIN_POSITIVE, f64::from_bits(1));
    // (minute, values): each minute is one batch, and the last minute gets a second batch later,
    // so stored windows merge with new ones too.
    let minutes: [(i64, Vec<f64>); 5] = [
        (0, vec![max, -max, tiny]),
        (1, vec![max, max, max]),
        (2, vec![-max, -max, max, sub]),
        (3, vec![tiny, -tiny, sub, 0.0]),
        (4, vec![max, 1.0, -1.0]),
    ];
    let mut seq = 0;
    for (minute, values) in &minutes {
        let readings: Vec<(&str, i64, f64)> =
            values.iter().enumerate().map(|(i, v)| ("x", T0 + minute * M + i as i64, *v)).collect();
        ingest_json(&agg, seq, &readings);
        seq += readings.len() as u64;
        agg.wait_processed();
    }
    ingest_json(&agg, seq, &[("x", T0 + 4 * M + 59_000, -max), ("x", T0 + 4 * M + 59_001, -max)]);
    agg.wait_processed();

    // The exact means, by hand: values are multiples of max, tiny and sub.
    let per_minute = [tiny / 3.0, max, -max / 4.0, sub / 4.0, -max / 5.0];
    let list = &all_sizes(&agg, "x")[0];
    let means: Vec<f64> = list.as_array().unwrap().iter().map(|w| w["mean"].as_f64().unwrap()).collect();
    assert_eq!(means.len(), 5, "{list}");
    for (minute, (mean, exact)) in means.iter().zip(per_minute).enumerate() {
        // Within the rounding of values of that size (the test's stated tolerance is 1e-15 of
        // the largest |value|, or one subnormal step).
        let largest = minutes[minute].1.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!((mean - exact).abs() <= (largest * 1e-15).max(sub), "minute {minute}: {mean} vs {exact}");
    }
    assert_eq!(list[3]["mean"].as_f64(), Some(0.0), "a mean below half the smallest subnormal rounds to 0");
    // The five minutes as one window: 19 readings summing to max (tiny and sub are lost in it).
    let five = &windows(&agg, "x", "5m")[0];
    assert_eq!((five["count"].as_u64(), five["min"].as_f64(), five["max"].as_f64()), (Some(19), Some(-max), Some(max)));
    let mean = five["mean"].as_f64().unwrap();
    assert!((mean - max / 19.0).abs() <= max * 1e-14, "{mean} vs {}", max / 19.0);
    assert_eq!(agg.get("/healthz").status, 200);
}
