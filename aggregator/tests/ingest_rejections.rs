//! Every refused ingest request gets its status and a reason, and writes nothing.

mod common;

use common::{AGENTS, Aggregator, T0, log_totals, postcard_batch, steady};

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
    assert_eq!(wrong_token.status, 401, "{}", wrong_token.text());
    assert!(wrong_token.json()["error"].as_str().unwrap().contains("token"));
    assert_eq!(agg.ingest(None, pc, &good).status, 401);

    let garbage = agg.ingest(Some(AGENTS[0].1), pc, b"\x05gw-1\xff\xff\xff");
    assert_eq!(garbage.status, 400);
    assert!(garbage.json()["error"].as_str().unwrap().contains("not a postcard batch"), "{}", garbage.text());

    let bad_json = agg.ingest(Some(AGENTS[0].1), "application/json", b"{\"agent_id\": \"gw-1\", \"epoch\": }");
    assert_eq!(bad_json.status, 400);
    assert!(bad_json.json()["error"].as_str().unwrap().contains("not a JSON batch"), "{}", bad_json.text());

    let nan = postcard_batch("gw-1", 1, &[(5, &[("room1/temp", T0, f64::NAN)])]);
    let invalid = agg.ingest(Some(AGENTS[0].1), pc, &nan);
    assert_eq!(invalid.status, 400);
    assert!(invalid.json()["error"].as_str().unwrap().contains("not a finite number"), "{}", invalid.text());

    let unknown_agent = postcard_batch("gw-9", 1, &[(0, &steady("room1/temp", T0, 5))]);
    let forbidden = agg.ingest(Some(AGENTS[0].1), pc, &unknown_agent);
    assert_eq!(forbidden.status, 403, "{}", forbidden.text());
    let other_agent = postcard_batch("gw-2", 1, &[(0, &steady("room1/temp", T0, 5))]);
    assert_eq!(agg.ingest(Some(AGENTS[0].1), pc, &other_agent).status, 403);

    assert_eq!(agg.ingest(Some(AGENTS[0].1), "text/plain", &good).status, 415);

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
    assert_eq!(oversized.status, 413, "{}", oversized.text());

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
    assert_eq!(sensors["sensors"][0]["count"], 5);
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
