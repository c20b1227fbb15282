//! `POST /write`: InfluxDB 1.x line protocol as Telegraf sends it, through the real binary.

mod common;

use std::io::Write;

use base64::Engine;
use common::{AGENTS, Aggregator, Response, T0, gap_rows, log_totals, logged_blocks};
use serde_json::json;
use tributary_aggregator::influx::INFLUX_EPOCH;
use tributary_shared::Block;

const NS: i64 = 1_000_000;

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

/// POSTs line protocol to `/write?<query>` with extra headers.
fn write(agg: &Aggregator, query: &str, headers: &[(&str, String)], body: &[u8]) -> Response {
    let path = if query.is_empty() { "/write".to_string() } else { format!("/write?{query}") };
    common::http(agg.addr, "POST", &path, headers, body)
}

/// POSTs plain line protocol as `AGENTS[agent]` with a bearer token, expecting 204.
fn write_ok(agg: &Aggregator, agent: usize, query: &str, body: &str) {
    let response = write(agg, query, &[("Authorization", format!("Bearer {}", AGENTS[agent].1))], body.as_bytes());
    assert_eq!(response.status, 204, "{}", response.text());
}

/// A sensor id as a path segment.
fn enc(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

fn sensor(agg: &Aggregator, id: &str) -> serde_json::Value {
    let (status, body) = agg.get_json(&format!("/api/v1/sensors/{}", enc(id)));
    assert_eq!(status, 200, "{id}: {body}");
    body
}

/// (count, last value, last ts) of a served sensor.
fn served(agg: &Aggregator, id: &str) -> (u64, f64, i64) {
    let s = sensor(agg, id);
    (s["count"].as_u64().unwrap(), s["last_value"].as_f64().unwrap(), s["last_ts"].as_i64().unwrap())
}

fn assert_error(response: &Response, status: u16, code: &str, detail: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    let body = response.json();
    assert_eq!(body["error"], code, "{body}");
    let text = body["detail"].as_str().unwrap_or_else(|| panic!("no detail in {body}"));
    assert!(text.contains(detail), "{detail:?} not in {body}");
}

#[test]
fn telegraf_lines_become_readings() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let t = T0 * NS;
    let t2 = (T0 + 10_000) * NS;
    // As Telegraf's influx serializer writes it: tags sorted, ns timestamps, escaped names.
    let body = format!(
        "cpu,cpu=cpu0,host=gw1 usage_idle=97.5,usage_user=1.25,usage_system=0.5 {t}\n\
         cpu,cpu=cpu1,host=gw1 usage_idle=88,usage_user=10 {t}\n\
         mem,host=gw1 used=123456i,available_percent=61.2,free=42u {t}\n\
         system,host=gw1 load1=0.5,uptime=3600i,uptime_format=\"1:00, \\\"up\\\"\" {t}\n\
         net,host=gw1,interface=eth\\ 0 bytes_recv=1000i,up=true {t}\n\
         disk,device=sda1,fstype=ext4,host=gw1,path=/mnt/a\\,b\\=c used_percent=41.5,mode=\"rw\",ro=F {t}\n\
         my\\ app\\,v2,host=gw1 requests=5i,latency\\ ms=3.5e0 {t}\n\
         cpu,cpu=cpu0,host=gw1 usage_idle=96.5,usage_user=2.25,usage_system=1.25 {t2}\n"
    );
    let response = write(
        &agg,
        "db=telegraf",
        &[
            ("Authorization", format!("Bearer {}", AGENTS[0].1)),
            ("Content-Encoding", "gzip".into()),
            ("Content-Type", "text/plain; charset=utf-8".into()),
        ],
        &gzip(body.as_bytes()),
    );
    assert_eq!(response.status, 204, "{}", response.text());
    assert!(response.body.is_empty());
    agg.wait_processed();

    assert_eq!(served(&agg, "cpu/cpu0/gw1/usage_idle"), (2, 96.5, T0 + 10_000));
    assert_eq!(served(&agg, "cpu/cpu0/gw1/usage_system"), (2, 1.25, T0 + 10_000));
    assert_eq!(served(&agg, "cpu/cpu1/gw1/usage_user"), (1, 10.0, T0));
    assert_eq!(served(&agg, "mem/gw1/used"), (1, 123456.0, T0));
    assert_eq!(served(&agg, "mem/gw1/free"), (1, 42.0, T0));
    assert_eq!(served(&agg, "system/gw1/uptime"), (1, 3600.0, T0));
    assert_eq!(served(&agg, "net/gw1/eth 0/bytes_recv"), (1, 1000.0, T0));
    // Tag values in tag-key order: device, fstype, host, path.
    assert_eq!(served(&agg, "disk/sda1/ext4/gw1//mnt/a,b=c/used_percent"), (1, 41.5, T0));
    assert_eq!(served(&agg, "my app,v2/gw1/latency ms"), (1, 3.5, T0));
    assert_eq!(served(&agg, "my app,v2/gw1/requests"), (1, 5.0, T0));
    let (status, windows) =
        agg.get_json(&format!("/api/v1/sensors/{}/windows?size=1m", enc("cpu/cpu0/gw1/usage_idle")));
    assert_eq!(status, 200, "{windows}");
    let summary: Vec<serde_json::Value> = windows
        .as_array()
        .unwrap()
        .iter()
        .map(|w| json!({"start": w["start"], "count": w["count"], "min": w["min"], "max": w["max"], "mean": w["mean"]}))
        .collect();
    assert_eq!(summary, [json!({"start": T0, "count": 2, "min": 96.5, "max": 97.5, "mean": 97.0})]);

    // 17 numeric fields, no string or boolean among the sensors.
    let (_, list) = agg.get_json("/api/v1/sensors");
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 14, "{ids:?}");
    assert!(!ids.iter().any(|id| id.ends_with("/up") || id.ends_with("/mode") || id.ends_with("_format")), "{ids:?}");
    assert_eq!(agg.metric("tributary_influx_fields_skipped_total{kind=\"string\"}"), 2.0);
    assert_eq!(agg.metric("tributary_influx_fields_skipped_total{kind=\"boolean\"}"), 2.0);
    assert_eq!(agg.metric("tributary_influx_requests_total{status=\"204\"}"), 1.0);
    assert_eq!(agg.metric("tributary_influx_lines_rejected_total"), 0.0);
    // One request, one block, numbered by the aggregator in the writer's own stream.
    let blocks = logged_blocks(&agg.data_dir, "gw-1", INFLUX_EPOCH);
    assert_eq!(blocks.iter().map(|(seq, count, _)| (*seq, *count)).collect::<Vec<_>>(), [(0, 17)]);
    assert_eq!(Block::decode(&blocks[0].2).unwrap().len(), 17);
}

#[test]
fn every_auth_form_is_accepted_and_a_wrong_token_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let token = AGENTS[0].1;
    let basic = |user: &str, password: &str| {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
    };
    let line = |i: i64| format!("auth v={i} {}", T0 + i * 1000);
    let accepted: [(&str, Vec<(&str, String)>); 5] = [
        ("precision=ms", vec![("Authorization", format!("Bearer {token}"))]),
        ("precision=ms", vec![("Authorization", format!("Token {token}"))]),
        ("precision=ms", vec![("Authorization", basic("telegraf", token))]),
        ("precision=ms", vec![("Authorization", format!("Token telegraf:{token}"))]),
        (&format!("precision=ms&db=telegraf&u=telegraf&p={token}"), vec![]),
    ];
    for (i, (query, headers)) in accepted.iter().enumerate() {
        let response = write(&agg, query, headers, line(i as i64).as_bytes());
        assert_eq!(response.status, 204, "form #{i}: {}", response.text());
    }
    let refused: [(&str, Vec<(&str, String)>); 5] = [
        ("precision=ms", vec![]),
        ("precision=ms", vec![("Authorization", "Bearer not-a-token".into())]),
        ("precision=ms", vec![("Authorization", basic(token, "not-a-token"))]),
        ("precision=ms&u=telegraf&p=not-a-token", vec![]),
        ("precision=ms", vec![("Authorization", format!("Digest {token}"))]),
    ];
    for (query, headers) in &refused {
        assert_error(&write(&agg, query, headers, line(9).as_bytes()), 401, "unauthorized", "Bearer");
    }
    // The second agent's token writes into its own stream.
    write_ok(&agg, 1, "precision=ms", &line(5));
    agg.wait_processed();
    assert_eq!(served(&agg, "auth/v"), (6, 5.0, T0 + 5000));
    assert_eq!(logged_blocks(&agg.data_dir, "gw-1", INFLUX_EPOCH).len(), 5);
    assert_eq!(logged_blocks(&agg.data_dir, "gw-2", INFLUX_EPOCH).len(), 1);
    assert_eq!(agg.metric("tributary_influx_requests_total{status=\"401\"}"), 5.0);
}

#[test]
fn every_precision_lands_on_the_same_ms() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let at = T0 + 1_234;
    for (precision, ts) in [
        ("", at * NS),
        ("precision=ns", at * NS + 999_999),
        ("precision=u", at * 1000),
        ("precision=us", at * 1000 + 999),
        ("precision=ms", at),
    ] {
        let name = if precision.is_empty() { "default" } else { precision.trim_start_matches("precision=") };
        write_ok(&agg, 0, precision, &format!("prec,unit={name} v=1 {ts}"));
    }
    // Whole seconds, minutes and hours: T0 is a whole hour.
    assert_eq!(T0 % 3_600_000, 0);
    write_ok(&agg, 0, "precision=s", &format!("prec,unit=s v=1 {}", T0 / 1000));
    write_ok(&agg, 0, "precision=m", &format!("prec,unit=m v=1 {}", T0 / 60_000));
    write_ok(&agg, 0, "precision=h", &format!("prec,unit=h v=1 {}", T0 / 3_600_000));
    agg.wait_processed();
    for name in ["default", "ns", "u", "us", "ms"] {
        assert_eq!(served(&agg, &format!("prec/{name}/v")).2, at, "{name}");
    }
    for name in ["s", "m", "h"] {
        assert_eq!(served(&agg, &format!("prec/{name}/v")).2, T0, "{name}");
    }
    let bad = write(&agg, "precision=d", &[("Authorization", format!("Bearer {}", AGENTS[0].1))], b"prec v=1 1");
    assert_error(&bad, 400, "bad_request", "precision");
}

#[test]
fn bad_lines_among_good_are_rejected_and_the_good_served() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let t = |i: i64| (T0 + i * 1000) * NS;
    let too_long = "x".repeat(tributary_shared::MAX_SENSOR_ID_LEN);
    let body = format!(
        "good,n=1 v=1 {}\n\
         good,n=2 v=2,w=oops {}\n\
         good,n=3 v=3 {}\n\
         bad,n=4 v=1e999 {}\n\
         bad,n=5 v=5 {}\n\
         bad,n=6+ v=6 {}\n\
         bad,n=7 {too_long}=7 {}\n\
         bad,n=8 v=\"never closed {}\n\
         good,n=9 v=9i,s=\"text\" {}\n",
        t(1),
        t(2),
        t(3),
        t(4),
        MIN_BEFORE_2000,
        t(6),
        t(7),
        t(8),
        t(9),
    );
    let response = write(&agg, "", &[("Authorization", format!("Bearer {}", AGENTS[0].1))], body.as_bytes());
    assert_error(&response, 400, "partial_write", "6 of 9 lines rejected");
    let detail = response.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("line 2: field \"w\"") && detail.contains("line 4:"), "{detail}");
    assert!(detail.contains("line 5:") && detail.ends_with("; ..."), "the first three and a mark: {detail}");
    agg.wait_processed();
    assert_eq!(served(&agg, "good/1/v"), (1, 1.0, T0 + 1000));
    assert_eq!(served(&agg, "good/3/v"), (1, 3.0, T0 + 3000));
    assert_eq!(served(&agg, "good/9/v"), (1, 9.0, T0 + 9000));
    let (_, list) = agg.get_json("/api/v1/sensors");
    assert_eq!(list.as_array().unwrap().len(), 3, "only the good lines: {list}");
    assert_eq!(agg.metric("tributary_influx_lines_rejected_total"), 6.0);
    assert_eq!(agg.metric("tributary_influx_fields_skipped_total{kind=\"string\"}"), 1.0);
    assert_eq!(agg.metric("tributary_influx_requests_total{status=\"400\"}"), 1.0);
}

/// A nanosecond timestamp in 1999: before the shared lower bound.
const MIN_BEFORE_2000: i64 = 915_148_800_000 * NS;

#[test]
fn a_gzip_bomb_gets_413_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    write_ok(&agg, 0, "precision=ms", &format!("before v=1 {T0}"));
    let before = log_totals(&agg.data_dir);
    // A gzip member of 33 MiB of a valid line (~84 KB), 16 times: 528 MiB inflated, 1.3 MB
    // on the wire (gzip allows concatenated members).
    let line = format!("bomb v=1 {T0}\n");
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = line.repeat((1 << 20) / line.len());
    for _ in 0..33 {
        encoder.write_all(chunk.as_bytes()).unwrap();
    }
    let bomb = encoder.finish().unwrap().repeat(16);
    assert!(bomb.len() < 4 << 20, "{}", bomb.len());
    let headers = [("Authorization", format!("Bearer {}", AGENTS[0].1)), ("Content-Encoding", "gzip".to_string())];
    assert_error(&write(&agg, "precision=ms", &headers, &bomb), 413, "payload_too_large", "after decompression");
    assert_error(&write(&agg, "", &headers, b"not gzip at all"), 400, "bad_request", "gzip");
    let br = [("Authorization", format!("Bearer {}", AGENTS[0].1)), ("Content-Encoding", "br".to_string())];
    assert_error(&write(&agg, "", &br, b"x"), 415, "unsupported_media_type", "gzip");
    assert_eq!(log_totals(&agg.data_dir), before);
    // Inflating stopped at the limit: the process never held the bomb (its peak memory is a
    // fraction of what inflating it all would take).
    let peak_kib = peak_rss_kib(agg.child.id());
    assert!(peak_kib < 256 << 10, "peak RSS {peak_kib} KiB: the body was inflated past the limit");
    // And the server goes on taking writes.
    write_ok(&agg, 0, "precision=ms", &format!("after v=1 {T0}"));
    agg.wait_processed();
    assert_eq!(served(&agg, "after/v"), (1, 1.0, T0));
    assert!(agg.get_json("/api/v1/sensors/bomb%2Fv").0 == 404);
}

/// The process's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or_else(|| panic!("no VmHWM in\n{status}"));
    line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).unwrap()
}

#[test]
fn a_retried_write_is_logged_twice() {
    // Line protocol has no sequence numbers: a retry after a lost answer is new data to the
    // aggregator (at-least-once, as the README says).
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let body = format!("retry,host=gw1 a=1,b=2 {}\n", T0 * NS);
    write_ok(&agg, 0, "", &body);
    write_ok(&agg, 0, "", &body);
    agg.wait_processed();
    assert_eq!(served(&agg, "retry/gw1/a"), (2, 1.0, T0));
    let blocks = logged_blocks(&agg.data_dir, "gw-1", INFLUX_EPOCH);
    assert_eq!(blocks.iter().map(|(seq, count, _)| (*seq, *count)).collect::<Vec<_>>(), [(0, 2), (2, 2)]);
}

#[test]
fn concurrent_writes_are_numbered_without_collisions() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let addr = agg.addr;
            std::thread::spawn(move || {
                let body: String = (0..100).map(|i| format!("conc,w={w} v={i} {}\n", T0 + i)).collect();
                let headers = [("Authorization", format!("Bearer {}", AGENTS[0].1))];
                common::http(addr, "POST", "/write?precision=ms", &headers, body.as_bytes())
            })
        })
        .collect();
    for writer in writers {
        let response = writer.join().unwrap();
        assert_eq!(response.status, 204, "{}", response.text());
    }
    agg.wait_processed();
    for w in 0..8 {
        assert_eq!(served(&agg, &format!("conc/{w}/v")), (100, 99.0, T0 + 99), "writer {w}");
    }
    let mut ranges: Vec<(u64, u32)> =
        logged_blocks(&agg.data_dir, "gw-1", INFLUX_EPOCH).iter().map(|(seq, count, _)| (*seq, *count)).collect();
    ranges.sort_unstable();
    assert_eq!(ranges, (0..8).map(|i| (i * 100, 100)).collect::<Vec<_>>());
    assert!(gap_rows(&agg.data_dir, "gw-1", INFLUX_EPOCH).is_empty());
}

#[test]
fn ping_and_create_database_answer_like_influxdb() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    assert_eq!(agg.get("/ping").status, 204);
    assert_eq!(common::http(agg.addr, "HEAD", "/ping", &[], &[]).status, 204);
    // Telegraf's form: POST /query with the statement in a form body.
    let create = common::http(
        agg.addr,
        "POST",
        "/query",
        &[("Content-Type", "application/x-www-form-urlencoded".into())],
        b"q=CREATE+DATABASE+%22telegraf%22",
    );
    assert_eq!((create.status, create.json()), (200, json!({"results": [{"statement_id": 0}]})));
    let (status, body) = agg.get_json("/query?q=create%20database%20x");
    assert_eq!((status, body), (200, json!({"results": [{"statement_id": 0}]})));
    let select = agg.get("/query?q=SELECT+*+FROM+cpu");
    assert_error(&select, 400, "bad_request", "only CREATE DATABASE");
}
