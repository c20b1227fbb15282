//! Blocks may arrive in any order and overlap (concurrent requests, retries after a timeout,
//! clients other than the agent): the log keeps every sequence number exactly once, fills the
//! holes late blocks cover, keeps that state through a kill -9, and bounds the holes it tracks.

mod common;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{AGENTS, Aggregator, T0, gap_rows, handshake, log_totals, logged_blocks, postcard_batch, try_ingest};
use tributary_shared::Block;

const AGENT: &str = "gw-1";
const EPOCH: u64 = 5;

/// A batch of blocks `[first, end)` whose readings carry their own sequence number as value, so
/// the log can be checked reading by reading.
fn batch(blocks: &[(u64, u64)]) -> Vec<u8> {
    let owned: Vec<(u64, Vec<_>)> = blocks
        .iter()
        .map(|&(first, end)| {
            let readings = (first..end)
                .map(|s| (["o/a", "o/b", "o/c"][(s % 3) as usize], T0 + s as i64 * 1000, s as f64))
                .collect();
            (first, readings)
        })
        .collect();
    let refs: Vec<(u64, common::Readings<'_>)> = owned.iter().map(|(first, r)| (*first, &r[..])).collect();
    postcard_batch(AGENT, EPOCH, &refs)
}

/// Batches of one to three blocks covering `0..n` three times over, each time cut differently
/// (so blocks overlap at either end and in the middle), with a tenth of them resent, shuffled.
fn shuffled_batches(rng: &mut fastrand::Rng, n: u64) -> Vec<Vec<(u64, u64)>> {
    let mut blocks = Vec::new();
    for _ in 0..3 {
        let mut first = 0;
        while first < n {
            let end = (first + rng.u64(1..600)).min(n);
            blocks.push((first, end));
            first = end;
        }
    }
    rng.shuffle(&mut blocks);
    let mut batches: Vec<Vec<(u64, u64)>> = Vec::new();
    let mut rest = &blocks[..];
    while !rest.is_empty() {
        let (take, more) = rest.split_at(rng.usize(1..=3).min(rest.len()));
        batches.push(take.to_vec());
        rest = more;
    }
    let resent: Vec<_> = batches.iter().filter(|_| rng.u8(0..10) == 0).cloned().collect();
    batches.extend(resent);
    rng.shuffle(&mut batches);
    batches
}

/// Every sequence number the log holds for (AGENT, EPOCH), sorted, duplicates kept; each
/// reading's value must be its sequence number (first_seq + index).
fn logged_seqs(agg: &Aggregator) -> Vec<u64> {
    let mut seqs = Vec::new();
    for (first_seq, count, data) in logged_blocks(&agg.data_dir, AGENT, EPOCH as i64) {
        let block = Block::decode(&data).unwrap();
        assert_eq!(block.len(), count as usize);
        for (i, (_, _, value)) in block.readings().enumerate() {
            assert_eq!(
                value,
                (first_seq + i as u64) as f64,
                "the block logged at seq {first_seq} holds another reading"
            );
            seqs.push(value as u64);
        }
    }
    seqs.sort_unstable();
    seqs
}

/// Sends `batches` from `senders` threads at once, each taking the next batch from a shared queue.
/// With `kill_at: Some((k, pid))` the sender that gets the k-th ack SIGKILLs the server at once,
/// while the others have requests in flight. A sender stops at its first failed request (the
/// server is gone). Returns the acks.
fn send_concurrently(
    agg: &Aggregator,
    batches: &[Vec<(u64, u64)>],
    senders: usize,
    kill_at: Option<usize>,
) -> Vec<serde_json::Value> {
    let queue = Mutex::new(batches.iter());
    let acks = Mutex::new(Vec::new());
    let acked = AtomicUsize::new(0);
    let (addr, pid) = (agg.addr, agg.child.id() as i32);
    std::thread::scope(|s| {
        for _ in 0..senders {
            s.spawn(|| {
                loop {
                    let Some(blocks) = queue.lock().unwrap().next() else { return };
                    match try_ingest(addr, 0, &batch(blocks)) {
                        Ok(response) if response.status == 200 => {
                            acks.lock().unwrap().push(response.json());
                            if Some(acked.fetch_add(1, Ordering::SeqCst) + 1) == kill_at {
                                // SAFETY: kill(2) on our own child's pid; it is reaped when `agg` drops.
                                unsafe { libc::kill(pid, libc::SIGKILL) };
                            }
                        }
                        Ok(response) => panic!("{blocks:?}: {} {}", response.status, response.text()),
                        Err(_) => return,
                    }
                }
            });
        }
    });
    acks.into_inner().unwrap()
}

fn handshake_ack(agg: &Aggregator) -> serde_json::Value {
    agg.ingest_ok(0, &handshake(AGENT, EPOCH))
}

#[test]
fn concurrent_overlapping_out_of_order_senders_log_every_reading_once() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let n = 20_000;
    let batches = shuffled_batches(&mut fastrand::Rng::with_seed(11), n);
    let acks = send_concurrently(&agg, &batches, 4, None);
    assert_eq!(acks.len(), batches.len(), "every request answered 200");
    let accepted: u64 = acks.iter().map(|a| a["accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, n);
    // Out of order for real: some batches arrived above a hole, and later ones filled it.
    assert!(acks.iter().any(|a| a["missing"].as_u64() > Some(0)), "no ack ever saw a hole");
    assert!(agg.metric("tributary_ingest_gap_filled_readings_total") > 0.0);

    assert_eq!(logged_seqs(&agg), (0..n).collect::<Vec<_>>());
    assert_eq!(gap_rows(&agg.data_dir, AGENT, EPOCH as i64), []);
    assert_eq!(handshake_ack(&agg), serde_json::json!({"accepted": 0, "duplicates": 0, "next_seq": n, "missing": 0}));
    agg.wait_processed();
    let (_, sensors) = agg.get_json("/api/v1/sensors");
    let counted: u64 = sensors.as_array().unwrap().iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, n);
}

#[test]
fn out_of_order_ranges_survive_a_kill_9_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let n = 20_000;
    let mut rng = fastrand::Rng::with_seed(23);
    let batches = shuffled_batches(&mut rng, n);
    let kill_at = batches.len() / 3;
    let acked = send_concurrently(&agg, &batches, 3, Some(kill_at)).len();
    agg.kill();
    assert!(acked >= kill_at && acked < batches.len(), "{acked} of {} acked", batches.len());

    let agg = Aggregator::start(dir.path());
    // What the restarted aggregator says it holds is exactly what its log holds.
    let seqs = logged_seqs(&agg);
    let mut unique = seqs.clone();
    unique.dedup();
    assert_eq!(seqs, unique, "a sequence number logged twice");
    let mark = seqs.last().map_or(0, |s| s + 1);
    let holes: Vec<(u64, u64)> = {
        let mut holes = Vec::new();
        let mut expected = 0;
        for &s in &seqs {
            if s > expected {
                holes.push((expected, s));
            }
            expected = s + 1;
        }
        holes
    };
    assert!(!holes.is_empty(), "the kill left no hole; the test proves nothing");
    assert_eq!(gap_rows(&agg.data_dir, AGENT, EPOCH as i64), holes);
    assert_eq!(
        handshake_ack(&agg),
        serde_json::json!({"accepted": 0, "duplicates": 0, "next_seq": mark, "missing": mark - seqs.len() as u64})
    );

    // Everything again, in another order: only the unlogged readings are appended.
    let mut again = batches.clone();
    rng.shuffle(&mut again);
    let acks = send_concurrently(&agg, &again, 3, None);
    assert_eq!(acks.len(), again.len());
    let accepted: u64 = acks.iter().map(|a| a["accepted"].as_u64().unwrap()).sum();
    assert_eq!(accepted, n - seqs.len() as u64);
    assert_eq!(logged_seqs(&agg), (0..n).collect::<Vec<_>>());
    assert_eq!(gap_rows(&agg.data_dir, AGENT, EPOCH as i64), []);
    assert_eq!(handshake_ack(&agg)["next_seq"], n);
}

#[test]
fn a_client_sending_every_other_sequence_number_is_capped_with_too_many_holes() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    let limit = 10_000u64;
    let every_other: Vec<(u64, u64)> = (0..limit).map(|i| (2 * i + 1, 2 * i + 2)).collect();
    let ack = agg.ingest_ok(0, &batch(&every_other));
    assert_eq!(ack, serde_json::json!({"accepted": limit, "duplicates": 0, "next_seq": 2 * limit, "missing": limit}));
    let before = log_totals(&agg.data_dir);

    let one_more = batch(&[(2 * limit + 1, 2 * limit + 2)]);
    let refused = agg.ingest(Some(AGENTS[0].1), "application/x-postcard", &one_more);
    assert_eq!(refused.status, 400, "{}", refused.text());
    let body = refused.json();
    assert_eq!(body["error"], "too_many_holes");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("10001 holes") && detail.contains("limit is 10000"), "{detail}");
    assert_eq!(log_totals(&agg.data_dir), before, "a refused batch wrote something");
    assert_eq!(gap_rows(&agg.data_dir, AGENT, EPOCH as i64).len(), limit as usize);

    // Filling a hole is always accepted, and makes room for the refused batch.
    let ack = agg.ingest_ok(0, &batch(&[(0, 1)]));
    assert_eq!((ack["accepted"].as_u64(), ack["missing"].as_u64()), (Some(1), Some(limit - 1)));
    assert_eq!(agg.ingest_ok(0, &one_more)["missing"], limit);
}

/// What an operator sees of the holes: `GET /api/v1/gaps` lists each range not delivered, by
/// agent, paged, until late readings fill it.
#[test]
fn the_api_lists_holes_until_late_readings_fill_them() {
    let dir = tempfile::tempdir().unwrap();
    let agg = Aggregator::start(dir.path());
    handshake_ack(&agg);
    agg.ingest_ok(0, &batch(&[(0, 10)]));
    assert_eq!(agg.ingest_ok(0, &batch(&[(20, 30)]))["missing"], 10);
    assert_eq!(agg.ingest_ok(0, &batch(&[(40, 45)]))["missing"], 20);

    let (status, gaps) = agg.get_json("/api/v1/gaps");
    assert_eq!(status, 200, "{gaps}");
    let ranges: Vec<(u64, u64, u64)> = gaps
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            assert_eq!((g["agent"].as_str(), g["epoch"].as_u64()), (Some(AGENT), Some(EPOCH)), "{g}");
            assert!(g["detected_at"].as_i64().unwrap() > T0, "{g}");
            (g["from_seq"].as_u64().unwrap(), g["to_seq"].as_u64().unwrap(), g["readings"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(ranges, [(10, 20, 10), (30, 40, 10)]);

    // Paged: one at a time, the Link header leads to the next.
    let first = agg.get("/api/v1/gaps?limit=1");
    let link = first.header("link").expect("a Link to the next page").to_string();
    let next = link.trim_start_matches('<').split('>').next().unwrap().to_string();
    let (_, second) = agg.get_json(&next);
    assert_eq!(second.as_array().unwrap().len(), 1, "{second}");
    assert_eq!(second[0]["from_seq"], 30);
    assert!(agg.get(&next).header("link").is_none(), "the last page has no next");
    // By agent, and a bad cursor is a 400 that says what it wants.
    assert_eq!(agg.get_json("/api/v1/gaps?agent=gw-2").1, serde_json::json!([]));
    let bad = agg.get("/api/v1/gaps?after=yesterday");
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("id of a gap"), "{}", bad.text());

    // Late readings fill the first hole: it leaves the list.
    agg.ingest_ok(0, &batch(&[(10, 20)]));
    let (_, gaps) = agg.get_json("/api/v1/gaps");
    assert_eq!(gaps.as_array().unwrap().len(), 1, "{gaps}");
    assert_eq!((gaps[0]["from_seq"].as_u64(), gaps[0]["to_seq"].as_u64()), (Some(30), Some(40)));
}

/// What the agent knows about a hole it made (readings its spool dropped, and why) arrives by
/// `POST /api/v1/gaps` and is listed with the hole it explains; a report sent again replaces the
/// one before, and only the agent's own token may report for it.
#[test]
fn an_agents_gap_reports_are_listed_with_the_holes_they_explain() {
    let dir = tempfile::tempdir().unwrap();
    // With a read token: agents still report with their own tokens.
    let agg = Aggregator::start_with_http(dir.path(), "read_token = \"r\"\n", "");
    handshake_ack(&agg);
    agg.ingest_ok(0, &batch(&[(0, 10)]));
    agg.ingest_ok(0, &batch(&[(30, 40)]));
    let report = |agent: &str, from: u64, to: u64, reason: &str, sensors: usize| {
        let sensors: Vec<String> = (0..sensors).map(|i| format!("o/s{i}")).collect();
        serde_json::json!({"agent_id": agent, "epoch": EPOCH, "gaps": [{
            "from_seq": from, "to_seq": to, "readings": to - from, "first_ts": T0, "last_ts": T0 + 9_000,
            "sensors": sensors, "sensor_count": 3, "reason": reason, "recorded_at": T0 + 60_000}]})
        .to_string()
    };
    let post = |token: Option<&str>, body: String| {
        let mut headers = vec![("Content-Type", "application/json".to_string())];
        if let Some(token) = token {
            headers.push(("Authorization", format!("Bearer {token}")));
        }
        common::http(agg.addr, "POST", "/api/v1/gaps", &headers, body.as_bytes())
    };
    let (gw1, gw2) = (Some(common::AGENTS[0].1), Some(common::AGENTS[1].1));
    assert_eq!(post(None, report(AGENT, 10, 20, "spool_full", 3)).status, 401);
    assert_eq!(post(gw2, report(AGENT, 10, 20, "spool_full", 3)).status, 403);
    for bad in [report(AGENT, 20, 20, "spool_full", 3), report(AGENT, 10, 20, "", 3), report(AGENT, 10, 20, "x", 21)] {
        let response = post(gw1, bad);
        assert_eq!(response.status, 400, "{}", response.text());
        assert!(response.text().contains("gap report #0"), "{}", response.text());
    }
    assert_eq!(post(gw1, report(AGENT, 10, 20, "spool_full", 2)).status, 204);
    // Sent again, grown (the spool dropped more since): the same start, replaced.
    assert_eq!(post(gw1, report(AGENT, 10, 25, "spool_full", 3)).status, 204);

    let read = |path: &str| {
        let response = common::http(agg.addr, "GET", path, &[("Authorization", "Bearer r".to_string())], b"");
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    };
    let gaps = read("/api/v1/gaps");
    assert_eq!(gaps.as_array().unwrap().len(), 1, "{gaps}");
    let reports = gaps[0]["reports"].as_array().unwrap();
    assert_eq!(reports.len(), 1, "{gaps}");
    let r = &reports[0];
    assert_eq!((r["from_seq"].as_u64(), r["to_seq"].as_u64(), r["readings"].as_u64()), (Some(10), Some(25), Some(15)));
    assert_eq!((r["reason"].as_str(), r["sensor_count"].as_u64()), (Some("spool_full"), Some(3)));
    assert_eq!(r["sensors"], serde_json::json!(["o/s0", "o/s1", "o/s2"]));
    assert_eq!((r["first_ts"].as_i64(), r["last_ts"].as_i64()), (Some(T0), Some(T0 + 9_000)));
    // Reading the gaps still needs the read token.
    assert_eq!(agg.get("/api/v1/gaps").status, 401);
    // A hole filled by late readings leaves the list, its report with it.
    agg.ingest_ok(0, &batch(&[(10, 30)]));
    assert_eq!(read("/api/v1/gaps"), serde_json::json!([]));
}
