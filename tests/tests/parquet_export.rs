//! `format=parquet`: window lists and series as Parquet downloads, read back with the parquet
//! crate's own reader and held to the JSON answer of the same query, through the real binary.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Value, json};
use tributary_tests::{Aggregator, eventually, http};

const T0: i64 = 1_764_000_000_000 / 300_000 * 300_000;
const MINUTE: i64 = 60_000;
const AGENTS: &[(&str, &str)] = &[("gw-1", "secret-gw-1")];

/// Posts one block of readings as agent gw-1 (postcard, as the agent sends them).
async fn ingest(agg: &Aggregator, first_seq: u64, readings: &[(String, i64, f64)]) {
    let mut block = tributary_shared::BlockBuilder::default();
    for (sensor, ts, value) in readings {
        block.push(sensor, *ts, *value);
    }
    let data = block.finish().encode();
    let batch = tributary_shared::Batch {
        agent_id: "gw-1",
        epoch: 1,
        blocks: vec![tributary_shared::WireBlock { first_seq, count: readings.len() as u32, data: &data }],
    };
    let response = http()
        .post(format!("{}/api/v1/ingest", agg.url()))
        .header("content-type", "application/x-postcard")
        .bearer_auth("secret-gw-1")
        .body(batch.to_postcard())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
}

async fn processed(agg: &Aggregator, readings: u64) {
    eventually("the readings processed", Duration::from_secs(60), || async {
        (agg.total_readings().await == readings).then_some(())
    })
    .await;
}

struct Download {
    status: u16,
    content_type: String,
    disposition: String,
    body: Bytes,
}

async fn download(agg: &Aggregator, path: &str, accept: Option<&str>) -> Download {
    let mut request = http().get(format!("{}{path}", agg.url())).timeout(Duration::from_secs(60));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = request.send().await.unwrap();
    let header =
        |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let (status, content_type, disposition) =
        (response.status().as_u16(), header("content-type"), header("content-disposition"));
    let body = response.bytes().await.unwrap();
    Download { status, content_type, disposition, body }
}

async fn get_json(agg: &Aggregator, path: &str) -> Value {
    let d = download(agg, path, None).await;
    assert_eq!(d.status, 200, "{path}: {}", String::from_utf8_lossy(&d.body));
    serde_json::from_slice(&d.body).unwrap()
}

/// A Parquet download's rows as JSON objects (column → value), and its number of row groups.
fn rows(d: &Download) -> (Vec<Map<String, Value>>, usize) {
    let (rows, groups, _) = table(d);
    (rows, groups)
}

/// [`rows`], and the column names in the file's order.
fn table(d: &Download) -> (Vec<Map<String, Value>>, usize, Vec<String>) {
    assert_eq!(d.status, 200, "{}", String::from_utf8_lossy(&d.body));
    assert_eq!(d.content_type, "application/vnd.apache.parquet");
    assert!(
        d.disposition.starts_with("attachment; filename=\"") && d.disposition.ends_with(".parquet\""),
        "{}",
        d.disposition
    );
    let reader = SerializedFileReader::new(d.body.clone()).expect("a valid Parquet file");
    let groups = reader.metadata().num_row_groups();
    let names = reader.metadata().file_metadata().schema().get_fields().iter().map(|f| f.name().to_string()).collect();
    let rows = reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| {
            row.unwrap()
                .get_column_iter()
                .map(|(name, field)| {
                    let value = match field {
                        Field::Null => Value::Null,
                        Field::Str(s) => Value::from(s.as_str()),
                        Field::Long(v) | Field::TimestampMillis(v) => Value::from(*v),
                        Field::Double(v) => Value::from(*v),
                        other => panic!("{name}: unexpected {other:?}"),
                    };
                    (name.clone(), value)
                })
                .collect()
        })
        .collect();
    (rows, groups, names)
}

/// A JSON window as the Parquet row of `sensor`: `first`/`last` flattened as in the CSV.
fn flat(sensor: &str, window: &Value) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert("sensor".into(), sensor.into());
    for (key, value) in window.as_object().unwrap() {
        match key.as_str() {
            "first" | "last" => {
                row.insert(format!("{key}_ts"), value["ts"].clone());
                row.insert(format!("{key}_value"), value["value"].clone());
            }
            _ => {
                row.insert(key.clone(), value.clone());
            }
        }
    }
    row
}

/// The readings of the small scenario: two sensors over five minutes, with empty minutes.
fn small_readings() -> Vec<(String, i64, f64)> {
    let mut readings = Vec::new();
    for (minute, n) in [(0, 5), (1, 1), (3, 7)] {
        for i in 0..n {
            readings.push(("plant/a".to_string(), T0 + minute * MINUTE + i * 7_000, (minute * 10 + i) as f64 * 0.37));
        }
    }
    for minute in [0, 2, 4] {
        readings.push(("plant/b,\"odd\"".to_string(), T0 + minute * MINUTE + 500, -1.25 * minute as f64));
    }
    readings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_exports_hold_what_the_json_answers_hold() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), AGENTS).await;
    let readings = small_readings();
    ingest(&agg, 0, &readings).await;
    processed(&agg, readings.len() as u64).await;
    let range = format!("from={T0}&to={}", T0 + 5 * MINUTE);

    // One sensor, every member; and unbounded (the windows are counted before the download).
    for query in [format!("size=1m&{range}"), "size=1m".to_string(), format!("size=2m&{range}")] {
        let json = get_json(&agg, &format!("/api/v1/sensors/plant%2Fa/windows?{query}")).await;
        let expected: Vec<_> = json.as_array().unwrap().iter().map(|w| flat("plant/a", w)).collect();
        assert!(!expected.is_empty());
        let parquet = download(&agg, &format!("/api/v1/sensors/plant%2Fa/windows?{query}&format=parquet"), None).await;
        assert_eq!(parquet.disposition, "attachment; filename=\"plant_a-windows.parquet\"");
        let (got, _, names) = table(&parquet);
        assert_eq!(got, expected, "{query}");
        // The columns in the JSON's order, `first` and `last` as in the CSV.
        assert_eq!(
            names.join(","),
            "sensor,start,end,count,min,max,mean,stddev,first_ts,first_value,last_ts,last_value,p50,p95,p99,revision,updated_at"
        );
    }

    // Many sensors by glob, with the members asked for, chosen by Accept.
    let query = format!("/api/v1/windows?sensor=plant/*&size=1m&{range}&fields=start,count,mean,last,p95");
    let json = get_json(&agg, &query).await;
    let mut expected = Vec::new();
    for sensor in json.as_array().unwrap() {
        let id = sensor["sensor"].as_str().unwrap();
        expected.extend(sensor["windows"].as_array().unwrap().iter().map(|w| flat(id, w)));
    }
    assert_eq!(expected.len(), 6, "{json}");
    let parquet = download(&agg, &query, Some("application/vnd.apache.parquet")).await;
    let (got, _, names) = table(&parquet);
    assert_eq!(got, expected);
    assert_eq!(names.join(","), "sensor,start,count,mean,last_ts,last_value,p95");

    // A series: one column per aggregate, empty buckets null (count 0).
    let query = format!("/api/v1/sensors/plant%2Fa/series?{range}&step=1m&agg=mean,count,p95,last,stddev");
    let json = get_json(&agg, &query).await;
    let parquet = download(&agg, &format!("{query}&format=parquet"), None).await;
    assert_eq!(parquet.disposition, "attachment; filename=\"plant_a-series.parquet\"");
    let (got, _) = rows(&parquet);
    let times = json["time"].as_array().unwrap();
    assert_eq!(got.len(), times.len());
    for (i, row) in got.iter().enumerate() {
        let mut want = Map::new();
        want.insert("time".into(), times[i].clone());
        for agg in ["mean", "count", "p95", "last", "stddev"] {
            want.insert(agg.into(), json[agg][i].clone());
        }
        assert_eq!(row, &want, "bucket {i}");
    }
    assert_eq!((got[2]["mean"].clone(), got[2]["count"].clone()), (Value::Null, json!(0)), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_exports_come_whole_over_several_row_groups_and_caps_and_bad_parameters_are_400s() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), AGENTS).await;
    // Three sensors with a reading every minute for a week and a minute: 30,003 windows.
    const MINUTES: i64 = 10_001;
    for (s, sensor) in ["big/x", "big/y", "big/z"].into_iter().enumerate() {
        let readings: Vec<(String, i64, f64)> = (0..MINUTES)
            .map(|m| (sensor.to_string(), T0 + m * MINUTE + s as i64, ((m * 31 + s as i64) % 97) as f64 / 8.0))
            .collect();
        ingest(&agg, s as u64 * MINUTES as u64, &readings).await;
    }
    processed(&agg, 3 * MINUTES as u64).await;

    let query = format!("/api/v1/windows?sensor=big/*&size=1m&from={T0}&to={}", T0 + MINUTES * MINUTE);
    let json = get_json(&agg, &query).await;
    let mut expected = Vec::new();
    for sensor in json.as_array().unwrap() {
        let id = sensor["sensor"].as_str().unwrap();
        expected.extend(sensor["windows"].as_array().unwrap().iter().map(|w| flat(id, w)));
    }
    assert_eq!(expected.len(), 3 * MINUTES as usize);
    let (got, groups) = rows(&download(&agg, &format!("{query}&format=parquet"), None).await);
    assert!(groups >= 3, "{groups} row groups");
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the rows differ from the JSON answer's windows");

    // Past the cap (one sensor, 10,001 windows unbounded): the JSON answer's 400.
    let capped = "/api/v1/sensors/big%2Fx/windows?size=1m";
    let (status, error) = agg.get(capped).await;
    assert_eq!(status, 400);
    assert_eq!(agg.get(&format!("{capped}&format=parquet")).await, (status, error));

    // Bad parameters are the JSON 400, whatever the format.
    for bad in ["size=7s", "from=yesterday", "fields=avg", &format!("from={}&to={T0}", T0 + 1)] {
        let (status, error) = agg.get(&format!("/api/v1/sensors/big%2Fx/windows?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {error}");
        assert_eq!(
            agg.get(&format!("/api/v1/sensors/big%2Fx/windows?{bad}&format=parquet")).await,
            (400, error.clone())
        );
        let many = agg.get(&format!("/api/v1/windows?sensor=big/*&{bad}&format=parquet")).await;
        assert_eq!(many.0, 400, "{bad}: {}", many.1);
    }
    let (status, error) = agg.get(&format!("/api/v1/sensors/big%2Fx/series?from={T0}&to={T0}&format=parquet")).await;
    assert_eq!(status, 400, "{error}");
    for path in [
        "/api/v1/sensors/big%2Fx/windows?format=xml",
        "/api/v1/windows?sensor=big/*&format=xml",
        "/api/v1/sensors/big%2Fx/series?format=xml",
    ] {
        let (status, error) = agg.get(path).await;
        let detail = error["detail"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{path}: {error}");
        assert!(["json", "csv", "parquet"].iter().all(|f| detail.contains(f)), "{path}: {detail}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_download_leaves_the_aggregator_serving() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path(), AGENTS).await;
    const MINUTES: i64 = 8_000;
    let mut total = 0;
    for sensor in ["h/1", "h/2", "h/3", "h/4"] {
        let readings: Vec<(String, i64, f64)> =
            (0..MINUTES).map(|m| (sensor.to_string(), T0 + m * MINUTE, (m as f64 * 1.618).sin())).collect();
        ingest(&agg, total, &readings).await;
        total += readings.len() as u64;
    }
    processed(&agg, total).await;
    let path = format!("/api/v1/windows?sensor=h/*&size=1m&from={T0}&to={}&format=parquet", T0 + MINUTES * MINUTE);

    // Read the headers and the first bytes of the body, then hang up; several times over.
    for _ in 0..5 {
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", agg.port)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(socket, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut first = vec![0u8; 64 << 10];
        let mut read = 0;
        while read < 1024 {
            let n = socket.read(&mut first[read..]).unwrap();
            assert!(n > 0, "the connection closed early");
            read += n;
        }
        let head = String::from_utf8_lossy(&first[..read]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        drop(socket);
    }

    // The next download is whole.
    let (got, _) = rows(&download(&agg, &path, None).await);
    assert_eq!(got.len(), 4 * MINUTES as usize);
    assert_eq!(agg.get("/healthz").await.0, 200);
    let log = agg.process.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(!log.contains("failed mid-answer"), "a client hanging up is not a failure:\n{log}");
}
