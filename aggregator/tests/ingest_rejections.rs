//! Every refused ingest request gets its status and a reason, and writes nothing.

mod common;

use common::{AGENTS, Aggregator, Response, T0, log_totals, postcard_batch, steady};
use tributary_shared::{Batch, MAX_TS_MS, MIN_TS_MS, WireBlock};

/// A refusal as the contract has it: the status, JSON `{"error": code, "detail": text}`.
fn assert_refusal(response: &Response, status: u16, code: &str, detail: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"), "{}", response.text());
    let body = response.json();
    assert_eq!(body["error"], code, "{body}");
    let text = body["detail"].as_str().unwrap_or_else(|| panic!("no detail in {body}"));
    assert!(text.contains(detail), "{detail:?} not in {body}");
}

#[test]
fn refused_requests_leave_the_log_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let good = postcard_batch("gw-1", 1, &[(0, &steady("room1/temp", T0, 5))]);
    agg.ingest_ok(0, &good);
    agg.wait_processed();
    let before = log_totals(&agg.data_dir);
    assert_eq!(before, (1, 5));

    let pc = "application/x-postcard";
    let wrong_token = agg.ingest(Some("not-a-token"), pc, &good);
    assert_refusal(&wrong_token, 401, "unauthorized", "token");
    assert_refusal(&agg.ingest(None, pc, &good), 401, "unauthorized", "token");

    let garbage = agg.ingest(Some(AGENTS[0].1), pc, b"\x05gw-1\xff\xff\xff");
    assert_refusal(&garbage, 400, "malformed_batch", "not a postcard batch");

    let bad_json = agg.ingest(Some(AGENTS[0].1), "application/json", b"{\"agent_id\": \"gw-1\", \"epoch\": }");
    assert_refusal(&bad_json, 400, "malformed_batch", "not a JSON batch");

    let nan = postcard_batch("gw-1", 1, &[(5, &steady("room1/temp", T0, 2)), (7, &[("room1/temp", T0, f64::NAN)])]);
    let invalid = agg.ingest(Some(AGENTS[0].1), pc, &nan);
    assert_refusal(&invalid, 400, "invalid_block", "not a finite number");
    let body = invalid.json();
    assert_eq!((&body["block"], &body["first_seq"], &body["permanent"]), (&1.into(), &7.into(), &true.into()));

    let unknown_agent = postcard_batch("gw-9", 1, &[(0, &steady("room1/temp", T0, 5))]);
    assert_refusal(&agg.ingest(Some(AGENTS[0].1), pc, &unknown_agent), 403, "forbidden", "gw-9");
    let other_agent = postcard_batch("gw-2", 1, &[(0, &steady("room1/temp", T0, 5))]);
    assert_refusal(&agg.ingest(Some(AGENTS[0].1), pc, &other_agent), 403, "forbidden", "gw-2");

    assert_refusal(&agg.ingest(Some(AGENTS[0].1), "text/plain", &good), 415, "unsupported_media_type", "text/plain");

    let oversized = common::http(
        agg.addr,
        "POST",
        "/api/v1/ingest",
        &[
            ("Authorization", format!("Bearer {}", AGENTS[0].1)),
            ("Content-Type", pc.to_string()),
            ("Content-Length", (33u64 << 20).to_string()),
        ],
        &[],
    );
    assert_refusal(&oversized, 413, "payload_too_large", "smaller batches");

    assert_eq!(log_totals(&agg.data_dir), before);
    assert_eq!(agg.metric("tributary_log_end_offset"), 5.0);
    for (status, n) in [("200", 1.0), ("400", 3.0), ("401", 2.0), ("403", 2.0), ("413", 1.0), ("415", 1.0)] {
        assert_eq!(
            agg.metric(&format!("tributary_ingest_requests_total{{status=\"{status}\"}}")),
            n,
            "status {status}"
        );
    }
    let (_, sensors) = agg.get_json("/api/v1/sensors");
    assert_eq!(sensors[0]["count"], 5);
}

#[test]
fn batches_over_axums_2mb_default_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // ~3 MB (300k readings): over axum's 2 MB default, well under the 32 MiB limit.
    let readings: Vec<_> =
        (0..300_000).map(|i| ("big/sensor", T0 + i, (i % 1000) as f64 * 0.001 + 0.123456789)).collect();
    let mut b = tributary_shared::BlockBuilder::default();
    for (s, ts, v) in &readings {
        b.push(s, *ts, *v);
    }
    let data = b.finish().encode_postcard();
    assert!(data.len() > 2 << 20, "{} bytes", data.len());
    let batch = tributary_shared::Batch {
        agent_id: "gw-1",
        epoch: 1,
        blocks: vec![tributary_shared::WireBlock { first_seq: 0, count: 300_000, data: &data }],
    };
    let ack = agg.ingest_ok(0, &batch.to_postcard());
    assert_eq!(ack["accepted"], 300_000);
    assert_eq!(log_totals(&agg.data_dir), (1, 300_000));
}

#[test]
fn a_block_in_an_unknown_format_asks_for_an_upgrade_not_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    // Format byte 200: what a newer agent might write.
    let newer =
        Batch { agent_id: "gw-1", epoch: 1, blocks: vec![WireBlock { first_seq: 0, count: 1, data: &[200, 1, 2] }] };
    let response = agg.ingest(Some(AGENTS[0].1), "application/x-postcard", &newer.to_postcard());
    assert_refusal(&response, 400, "unsupported_format", "upgrade");
    assert!(response.json().get("permanent").is_none(), "{}", response.text());
    assert_eq!(log_totals(&agg.data_dir), (0, 0));
}

#[test]
fn json_timestamps_outside_the_years_2000_to_9999_are_invalid_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let body = |ts: i64| {
        format!(
            r#"{{"agent_id":"gw-1","epoch":1,"blocks":[{{"first_seq":0,"readings":[{{"sensor":"t/ok","ts":{T0},"value":1}}]}},{{"first_seq":1,"readings":[{{"sensor":"t/edge","ts":{ts},"value":2}}]}}]}}"#
        )
    };
    for ts in [i64::MAX, i64::MIN, MAX_TS_MS + 1, MIN_TS_MS - 1] {
        let response = agg.ingest(Some(AGENTS[0].1), "application/json", body(ts).as_bytes());
        assert_refusal(&response, 400, "invalid_block", &ts.to_string());
        let json = response.json();
        assert_eq!((&json["block"], &json["first_seq"], &json["permanent"]), (&1.into(), &1.into(), &true.into()));
    }
    assert_eq!(log_totals(&agg.data_dir), (0, 0), "a refused batch wrote something");
    // The last millisecond of 9999 is a valid time: it is logged, and reaches the API as a reading
    // quarantined for being far ahead of the aggregator's clock.
    let response = agg.ingest(Some(AGENTS[0].1), "application/json", body(MAX_TS_MS).as_bytes());
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["accepted"], 2);
    agg.wait_processed();
    let (_, sensor) = agg.get_json("/api/v1/sensors/t%2Fedge");
    assert_eq!((sensor["count"].as_u64(), sensor["quarantined"].as_u64()), (Some(0), Some(1)), "{sensor}");
    let (_, quarantined) = agg.get_json("/api/v1/quarantine?sensor=t%2Fedge");
    assert_eq!(quarantined[0]["ts"], MAX_TS_MS, "{quarantined}");
    assert_eq!(quarantined[0]["reason"], "future");
}
