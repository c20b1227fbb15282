//! The stream processing as a user sees it through the API: every logged reading in the windows
//! of every size or in quarantine, revisions for late data, calendar days across DST, globs,
//! anomalies, alerts with their lifecycle and webhooks (a real HTTP receiver on loopback).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{Aggregator, Receiver, T0, postcard_batch};
use serde_json::Value;
use tributary_shared::Block;

const S: i64 = 1000;
const M: i64 = 60 * S;
const H: i64 = 60 * M;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Readings per sensor in the log, decoded from `log.db` itself (derived `_...` streams left out).
fn logged_per_sensor(agg: &Aggregator) -> BTreeMap<String, u64> {
    let conn =
        rusqlite::Connection::open_with_flags(agg.data_dir.join("log.db"), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn.prepare("SELECT data FROM blocks").unwrap();
    let mut out = BTreeMap::new();
    for data in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
        let block = Block::decode(&data.unwrap()).unwrap();
        for (sensor, _, _) in block.readings() {
            if !sensor.starts_with('_') {
                *out.entry(sensor.to_string()).or_insert(0) += 1;
            }
        }
    }
    out
}

/// Sum of window counts per sensor for one size, read through the multi-sensor endpoint.
fn windowed_per_sensor(agg: &Aggregator, glob: &str, size: &str) -> BTreeMap<String, u64> {
    let (status, body) = agg.get_json(&format!("/api/v1/windows?sensor={glob}&size={size}"));
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let total = s["windows"].as_array().unwrap().iter().map(|w| w["count"].as_u64().unwrap()).sum();
            (s["sensor"].as_str().unwrap().to_string(), total)
        })
        .collect()
}

fn quarantined(agg: &Aggregator, sensor: &str) -> Vec<Value> {
    let (status, body) = agg.get_json(&format!("/api/v1/quarantine?sensor={}", sensor.replace('/', "%2F")));
    assert_eq!(status, 200, "{body}");
    body.as_array().unwrap().clone()
}

#[test]
fn every_logged_reading_is_in_the_windows_or_quarantined_for_every_size() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), "[pipeline]\ndays = { tz = \"Europe/Berlin\" }\n");
    let now = now_ms();
    // On time, three hours late, an hour in the future (a device with a wrong clock), and one
    // batch resent by the agent (its readings logged once).
    let on_time: Vec<(&str, i64, f64)> =
        (0..120).map(|i| (["mix/a", "mix/b", "mix/c"][i % 3], now - 60 * S + i as i64 * 500, i as f64)).collect();
    let late: Vec<(&str, i64, f64)> =
        (0..90).map(|i| (["mix/a", "mix/b"][i % 2], now - 3 * H + i as i64 * 7 * S, -(i as f64))).collect();
    let future: Vec<(&str, i64, f64)> = (0..10).map(|i| ("mix/c", now + H + i as i64 * S, 1e308)).collect();
    let first = postcard_batch("gw-1", 1, &[(0, &on_time)]);
    agg.ingest_ok(0, &first);
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(120, &late), (210, &future)]));
    let again = agg.ingest_ok(0, &first);
    assert_eq!(again["duplicates"], 120, "{again}");
    agg.wait_processed();

    let logged = logged_per_sensor(&agg);
    assert_eq!(logged.values().sum::<u64>(), 220);
    for size in ["10s", "1m", "1h", "5m", "2h", "day"] {
        let windowed = windowed_per_sensor(&agg, "mix/*", size);
        for (sensor, in_log) in &logged {
            let in_windows = windowed.get(sensor).copied().unwrap_or(0);
            let in_quarantine = quarantined(&agg, sensor).len() as u64;
            assert_eq!(
                in_windows + in_quarantine,
                *in_log,
                "{sensor} at size {size}: {in_windows} in windows + {in_quarantine} quarantined != {in_log} logged"
            );
        }
    }
    let held = quarantined(&agg, "mix/c");
    assert_eq!(held.len(), 10);
    assert!(held.iter().all(|q| q["reason"] == "future" && q["value"] == 1e308), "{held:?}");
    let (_, c) = agg.get_json("/api/v1/sensors/mix/c");
    assert_eq!((c["count"].as_u64(), c["quarantined"].as_u64()), (Some(40), Some(10)), "{c}");
    // The future readings did not move the sensor's latest value.
    assert!(c["last_ts"].as_i64().unwrap() <= now, "{c}");
}

#[test]
fn late_data_raises_the_revision_of_the_window_it_changes_and_only_that_one() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let minute = |agg: &Aggregator, start: i64| -> Value {
        let (_, w) = agg.get_json(&format!("/api/v1/sensors/late%2Fx/windows?size=1m&from={start}&to={}", start + M));
        w[0].clone()
    };
    // One block: three readings of minute 0 (a past minute: it has closed) and one of minute 1.
    agg.ingest_ok(
        0,
        &postcard_batch(
            "gw-1",
            1,
            &[(
                0,
                &[("late/x", T0, 1.0), ("late/x", T0 + S, 2.0), ("late/x", T0 + 2 * S, 3.0), ("late/x", T0 + M, 9.0)],
            )],
        ),
    );
    agg.wait_processed();
    let first = minute(&agg, T0);
    assert_eq!((first["count"].as_u64(), first["revision"].as_u64()), (Some(3), Some(0)), "{first}");
    // Two later blocks change minute 0: two revisions. Minute 1 is untouched.
    agg.ingest_ok(
        0,
        &postcard_batch("gw-1", 1, &[(4, &[("late/x", T0 + 30 * S, 10.0), ("late/x", T0 + 31 * S, 0.0)])]),
    );
    agg.wait_processed();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(6, &[("late/x", T0 + 59 * S, 4.0)])]));
    agg.wait_processed();
    let revised = minute(&agg, T0);
    assert_eq!(
        (revised["count"].as_u64(), revised["revision"].as_u64(), revised["max"].as_f64(), revised["min"].as_f64()),
        (Some(6), Some(2), Some(10.0), Some(0.0)),
        "{revised}"
    );
    assert!(revised["updated_at"].as_i64() > first["updated_at"].as_i64(), "{first} then {revised}");
    assert_eq!((revised["first"]["value"].as_f64(), revised["last"]["value"].as_f64()), (Some(1.0), Some(4.0)));
    assert_eq!(minute(&agg, T0 + M)["revision"], 0);
    // Merged sizes carry the revisions of the windows they merge.
    let (_, hour) = agg.get_json("/api/v1/sensors/late%2Fx/windows?size=1h");
    assert_eq!((hour[0]["count"].as_u64(), hour[0]["revision"].as_u64()), (Some(7), Some(2)), "{hour}");
}

#[test]
fn calendar_days_follow_daylight_saving_in_the_configured_zone() {
    // Local midnights in Europe/Berlin (UTC+1 in winter, UTC+2 in summer).
    const MAR_28: i64 = 1_774_652_400_000;
    const MAR_29: i64 = 1_774_738_800_000; // clocks go forward: a 23-hour day
    const MAR_30: i64 = 1_774_821_600_000;
    const OCT_25: i64 = 1_792_879_200_000; // clocks go back: a 25-hour day
    const OCT_26: i64 = 1_792_969_200_000;
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start_with(dir.path(), "[pipeline]\ndays = { tz = \"Europe/Berlin\" }\n");
    let readings = [
        ("dst/t", MAR_28 + H, 1.0),
        ("dst/t", MAR_29 - 1, 2.0), // last millisecond of the 28th
        ("dst/t", MAR_29, 3.0),
        ("dst/t", MAR_30 - 1, 4.0),
        ("dst/t", OCT_25 + 24 * H + 30 * M, 5.0), // 23:30 local: the 25th hour of the 25th
        ("dst/t", OCT_26, 6.0),
    ];
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    let (status, days) = agg.get_json("/api/v1/sensors/dst%2Ft/windows?size=day");
    assert_eq!(status, 200, "{days}");
    let got: Vec<(i64, i64, u64)> = days
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["start"].as_i64().unwrap(), w["end"].as_i64().unwrap(), w["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, [(MAR_28, MAR_29, 2), (MAR_29, MAR_30, 2), (OCT_25, OCT_26, 1), (OCT_26, OCT_26 + 24 * H, 1),]);
    assert_eq!(MAR_30 - MAR_29, 23 * H);
    assert_eq!(OCT_26 - OCT_25, 25 * H);
}

#[test]
fn a_glob_reads_many_sensors_windows_in_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let readings = [
        ("line1/temp", T0, 1.0),
        ("line1/press", T0, 2.0),
        ("line1/deep/temp", T0, 3.0),
        ("line2/temp", T0, 4.0),
        ("line10/temp", T0, 5.0),
    ];
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    let sensors = |glob: &str| -> Vec<String> {
        let (status, body) = agg.get_json(&format!("/api/v1/windows?sensor={glob}&size=1m"));
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().iter().map(|s| s["sensor"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(sensors("line1/*"), ["line1/press", "line1/temp"]);
    assert_eq!(sensors("line1/**"), ["line1/deep/temp", "line1/press", "line1/temp"]);
    assert_eq!(sensors("line*/temp"), ["line1/temp", "line10/temp", "line2/temp"]);
    assert_eq!(sensors("line%3F/temp"), ["line1/temp", "line2/temp"]);
    let bad = agg.get("/api/v1/windows?sensor=line%5B/temp&size=1m");
    assert_eq!(bad.status, 400, "{}", bad.text());
    let (_, prefixed) = agg.get_json("/api/v1/sensors?prefix=line1%2F");
    assert_eq!(prefixed.as_array().unwrap().len(), 3);
}

#[test]
fn a_fleet_read_split_over_cores_keeps_sensor_order_every_reading_and_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // 130 sensors: enough for the read to be split in parts (64 sensors or more per part).
    let names: Vec<String> = (0..130).map(|i| format!("fleet/s{i:03}")).collect();
    let readings: Vec<(&str, i64, f64)> =
        names.iter().flat_map(|n| (0..770).map(move |k| (n.as_str(), T0 + k * 10_000, k as f64))).collect();
    for (i, chunk) in readings.chunks(10_010).enumerate() {
        agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[((i * 10_010) as u64, chunk)]));
    }
    agg.wait_processed();

    let (status, hour) = agg.get_json("/api/v1/windows?sensor=fleet/*&size=1m&fields=count");
    assert_eq!(status, 200, "{hour}");
    let sensors: Vec<&str> = hour.as_array().unwrap().iter().map(|s| s["sensor"].as_str().unwrap()).collect();
    assert_eq!(sensors, names.iter().map(String::as_str).collect::<Vec<_>>());
    let counted: u64 = hour
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["windows"].as_array().unwrap().iter().map(|w| w["count"].as_u64().unwrap()))
        .sum();
    assert_eq!(counted, 130 * 770);

    // With from/to the answer cannot pass the cap, so it is streamed part by part in chunks of
    // 256 KiB (this one is ~4 MB): the same answer as the read counted before it was sent.
    let range = format!("from={}&to={}", T0 - 60_000, T0 + 770 * 10_000);
    let (status, counted_first) = agg.get_json("/api/v1/windows?sensor=fleet/*&size=1m");
    assert_eq!(status, 200);
    let (status, streamed) = agg.get_json(&format!("/api/v1/windows?sensor=fleet/*&size=1m&{range}"));
    assert_eq!(status, 200);
    assert_eq!(streamed.as_array().unwrap().len(), 130);
    assert_eq!(streamed, counted_first);
    let csv_counted = agg.get("/api/v1/windows?sensor=fleet/*&size=1m&format=csv");
    let csv_streamed = agg.get(&format!("/api/v1/windows?sensor=fleet/*&size=1m&format=csv&{range}"));
    assert_eq!((csv_counted.status, csv_streamed.status), (200, 200));
    assert_eq!(csv_streamed.text().lines().count(), 1 + 130 * 129, "a header and every window");
    assert_eq!(csv_streamed.text(), csv_counted.text());

    // Clients that hang up after the first bytes of a streamed answer, a few at once and again:
    // every part stops, and the next answer is whole.
    for _ in 0..3 {
        let cut: Vec<_> = (0..4)
            .map(|_| {
                let mut stream = std::net::TcpStream::connect(agg.addr).unwrap();
                let path = format!("/api/v1/windows?sensor=fleet/*&size=1m&{range}");
                write!(stream, "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", agg.addr).unwrap();
                let mut first = [0u8; 4096];
                stream.read_exact(&mut first).unwrap();
                stream
            })
            .collect();
        drop(cut);
    }
    let (status, again) = agg.get_json(&format!("/api/v1/windows?sensor=fleet/*&size=1m&{range}"));
    assert_eq!((status, &again), (200, &counted_first));

    // 130 x 770 ten-second windows are 100,100: over the cap of 100,000, whichever part holds them.
    let over = agg.get("/api/v1/windows?sensor=fleet/*&size=10s&fields=count");
    assert_eq!(over.status, 400, "{}", over.text());
    assert!(over.text().contains("100000"), "{}", over.text());
    let (status, under) = agg.get_json("/api/v1/windows?sensor=fleet/s0*&size=10s&fields=count");
    assert_eq!(status, 200);
    assert_eq!(under.as_array().unwrap().len(), 100);
}

#[test]
fn fields_narrow_each_window_to_the_members_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let readings = [("line1/temp", T0, 1.0), ("line1/temp", T0 + 1_000, 3.0), ("line1/press", T0, 2.0)];
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    let (status, all) = agg.get_json("/api/v1/windows?sensor=line1/*&size=1m");
    assert_eq!(status, 200, "{all}");
    let full = &all[1]["windows"][0];
    assert_eq!(full.as_object().unwrap().len(), 14, "{full}");

    let (status, narrow) = agg.get_json("/api/v1/windows?sensor=line1/*&size=1m&fields=max,start,p95");
    assert_eq!(status, 200, "{narrow}");
    let window = &narrow[1]["windows"][0];
    assert_eq!(narrow[1]["sensor"], "line1/temp");
    assert_eq!(window.as_object().unwrap().keys().collect::<Vec<_>>(), ["max", "p95", "start"]);
    for key in ["max", "p95", "start"] {
        assert_eq!(window[key], full[key], "{key}");
    }
    assert_eq!(window["max"], 3.0);

    let (status, one) = agg.get_json("/api/v1/sensors/line1%2Ftemp/windows?size=2m&fields=count,mean");
    assert_eq!(status, 200, "{one}");
    assert_eq!(one[0], serde_json::json!({"count": 2, "mean": 2.0}));

    let bad = agg.get("/api/v1/windows?sensor=line1/*&size=1m&fields=mean,avg");
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert!(bad.text().contains("avg"), "{}", bad.text());
}

/// A webhook that accepts connections and never answers.
fn black_hole() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    url
}

#[test]
fn a_threshold_alert_fires_resolves_and_reaches_a_webhook_while_a_dead_one_slows_nothing() {
    let receiver = Receiver::start(1);
    let dead = black_hole();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[alerts]]\nname = \"hot\"\nsensor = \"line*/temp\"\nabove = 80.0\nfor = \"30s\"\nclear = 75.0\nseverity = \"critical\"\n\
         [[notify]]\nurl = \"{}\"\n[[notify]]\nurl = \"{dead}\"\ntimeout = \"60s\"\n",
        receiver.url
    );
    let agg = Aggregator::start_with(dir.path(), &extra);
    // Above 80 from 10 s on, for 30 s at 40 s; back under 75 at 60 s. line2 never holds for 30 s.
    let readings = [
        ("line1/temp", T0, 70.0),
        ("line1/temp", T0 + 10 * S, 85.0),
        ("line2/temp", T0 + 10 * S, 90.0),
        ("line1/temp", T0 + 25 * S, 82.0),
        ("line2/temp", T0 + 20 * S, 60.0),
        ("line1/temp", T0 + 40 * S, 81.0),
        ("line1/temp", T0 + 50 * S, 78.0),
        ("line1/temp", T0 + 60 * S, 74.0),
        ("other/temp", T0 + 60 * S, 1000.0),
    ];
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings[..6])]));
    agg.wait_processed();
    let (_, firing) = agg.get_json("/api/v1/alerts?state=firing");
    assert_eq!(firing.as_array().unwrap().len(), 1, "{firing}");
    assert_eq!(
        (&firing[0]["rule"], &firing[0]["sensor"], &firing[0]["severity"], &firing[0]["kind"]),
        (&"hot".into(), &"line1/temp".into(), &"critical".into(), &"reading".into())
    );
    assert_eq!((firing[0]["fired_ts"].as_i64(), firing[0]["fired_value"].as_f64()), (Some(T0 + 40 * S), Some(81.0)));

    // Thousands of readings while one webhook hangs: the pipeline keeps up all the same.
    let bulk: Vec<(&str, i64, f64)> = (0..5_000).map(|i| ("bulk/x", T0 + i * S, i as f64)).collect();
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(6, &readings[6..]), (9, &bulk)]));
    agg.wait_processed();
    let (_, firing) = agg.get_json("/api/v1/alerts?state=firing");
    assert_eq!(firing, serde_json::json!([]));
    let (_, resolved) = agg.get_json("/api/v1/alerts?state=resolved");
    assert_eq!(
        (resolved[0]["resolved_ts"].as_i64(), resolved[0]["resolved_value"].as_f64()),
        (Some(T0 + 60 * S), Some(74.0))
    );

    // The webhook got both transitions, the first after a retry (its first answer was 503).
    let bodies = eventually("two notifications", || {
        let b = receiver.bodies();
        (b.len() >= 2).then_some(b)
    });
    let states: Vec<&str> = bodies.iter().map(|b| b["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["firing", "resolved"], "{bodies:?}");
    assert_eq!(
        (&bodies[0]["rule"], &bodies[0]["sensor"], &bodies[0]["value"], &bodies[0]["kind"]),
        (&"hot".into(), &"line1/temp".into(), &81.0.into(), &"reading".into())
    );
    assert!(agg.metric("tributary_notify_total{result=\"retried\"}") >= 1.0);
    assert_eq!(agg.metric("tributary_notify_total{result=\"delivered\"}"), 2.0);

    // The transitions are a stream of their own in the log: 1 while firing, 0 once resolved.
    let (_, derived) = agg.get_json("/api/v1/sensors/_alert/hot/line1/temp/windows?size=1m");
    assert_eq!(
        (derived[0]["count"].as_u64(), derived[0]["max"].as_f64(), derived[0]["min"].as_f64()),
        (Some(1), Some(1.0), Some(1.0)),
        "{derived}"
    );
    assert_eq!((derived[1]["count"].as_u64(), derived[1]["last"]["value"].as_f64()), (Some(1), Some(0.0)), "{derived}");
}

#[test]
fn an_outlier_is_an_anomaly_event_with_its_expected_range_and_fires_an_anomaly_alert() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[[anomaly]]\nsensor = \"pump/*\"\nthreshold = 5.0\nwarmup = 20\nwindow = 50\n\
                 [[alerts]]\nname = \"odd\"\nsensor = \"pump/*\"\nanomaly = true\n";
    let agg = Aggregator::start_with(dir.path(), extra);
    let mut readings: Vec<(&str, i64, f64)> =
        (0..60).map(|i| ("pump/1", T0 + i * S, 50.0 + [0.0, 0.5, -0.5, 1.0, -1.0][i as usize % 5])).collect();
    readings.push(("pump/1", T0 + 60 * S, 500.0));
    readings.push(("pump/1", T0 + 61 * S, 50.2));
    // A spike during warm-up is not scored.
    readings.push(("pump/2", T0, 50.0));
    readings.push(("pump/2", T0 + S, 5000.0));
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &readings)]));
    agg.wait_processed();
    let (status, events) = agg.get_json("/api/v1/anomalies?sensor=pump/*");
    assert_eq!(status, 200, "{events}");
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(
        (&e["sensor"], e["ts"].as_i64(), e["value"].as_f64()),
        (&"pump/1".into(), Some(T0 + 60 * S), Some(500.0))
    );
    let (low, high, score) =
        (e["expected_low"].as_f64().unwrap(), e["expected_high"].as_f64().unwrap(), e["score"].as_f64().unwrap());
    assert!(low < 50.0 && 50.0 < high && high < 500.0 && score > 5.0, "{e}");
    let (_, none) = agg.get_json(&format!("/api/v1/anomalies?sensor=pump/1&from={}", T0 + 61 * S));
    assert_eq!(none, serde_json::json!([]));
    let (_, score_stream) = agg.get_json("/api/v1/sensors/_anomaly/pump/1/windows?size=1m");
    assert_eq!(score_stream[0]["max"].as_f64(), Some(score), "{score_stream}");
    let (_, alerts) = agg.get_json("/api/v1/alerts");
    assert_eq!((alerts.as_array().unwrap().len(), &alerts[0]["state"]), (1, &"resolved".into()), "{alerts}");
}

#[test]
fn a_silent_sensor_raises_a_stale_alert_that_clears_when_it_is_heard_again() {
    let receiver = Receiver::start(0);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[alerts]]\nname = \"silent\"\nsensor = \"meter/*\"\nstale = \"2s\"\nseverity = \"info\"\n[[notify]]\nurl = \"{}\"\n",
        receiver.url
    );
    let agg = Aggregator::start_with(dir.path(), &extra);
    agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(0, &[("meter/1", now_ms(), 1.0)])]));
    let fired = eventually("a stale alert", || {
        let (_, a) = agg.get_json("/api/v1/alerts?state=firing");
        (a.as_array().unwrap().len() == 1).then_some(a)
    });
    assert_eq!(
        (&fired[0]["kind"], &fired[0]["sensor"], &fired[0]["rule"]),
        (&"stale".into(), &"meter/1".into(), &"silent".into())
    );
    // The meter comes back and reports every 200 ms.
    let mut seq = 1;
    eventually("the stale alert to resolve", || {
        agg.ingest_ok(0, &postcard_batch("gw-1", 1, &[(seq, &[("meter/1", now_ms(), 2.0)])]));
        seq += 1;
        std::thread::sleep(Duration::from_millis(150));
        let (_, a) = agg.get_json("/api/v1/alerts?state=resolved");
        (a.as_array().unwrap().len() == 1).then_some(())
    });
    let bodies = eventually("two notifications", || {
        let b = receiver.bodies();
        (b.len() >= 2).then_some(b)
    });
    assert_eq!(
        (&bodies[0]["state"], &bodies[1]["state"], &bodies[0]["kind"]),
        (&"firing".into(), &"resolved".into(), &"stale".into())
    );
    // Staleness is the clock's business, not the log's: nothing about it was appended.
    let (status, _) = agg.get_json("/api/v1/sensors/_alert/silent/meter/1");
    assert_eq!(status, 404);
}
