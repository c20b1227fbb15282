//! What Grafana's and the dashboard's reads cost on a store with history: 30 days of one reading a
//! minute for `sensors` sensors (default pipeline: 10 s, 1 m, 1 h windows), then p50/p99 of 100
//! runs of each read, in-process over loopback.
//!
//! `cargo run --release -p tributary-aggregator --example query_bench -- [sensors=1000]`

use std::time::{Duration, Instant};

use tributary_aggregator::{AgentConfig, Config};
use tributary_shared::{Batch, BlockBuilder, WireBlock};

const DAYS: i64 = 30;
const MINUTE: i64 = 60_000;

fn main() -> anyhow::Result<()> {
    let sensors: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(1_000);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let config = Config::loopback(dir.path(), vec![AgentConfig { id: "gw-1".into(), token: "t".into() }]);
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(tributary_aggregator::serve(config, listener, async {
        let _ = stop_rx.await;
    }));
    // Minute-aligned history ending at the last full hour before now.
    let end =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64 / 3_600_000 * 3_600_000;
    let start = end - DAYS * 86_400_000;
    let client = reqwest::Client::new();
    let loaded = Instant::now();
    let mut seq = 0u64;
    runtime.block_on(async {
        // A day of every sensor per batch, in blocks of 10,000 readings.
        for day in 0..DAYS {
            let mut blocks = Vec::new();
            let mut b = BlockBuilder::default();
            let mut first = seq;
            for minute in 0..1_440 {
                let ts = start + day * 86_400_000 + minute * MINUTE;
                for s in 0..sensors {
                    b.push(&format!("site/s{s:05}"), ts, 20.0 + (ts / MINUTE % 600) as f64 / 60.0 + s as f64 % 7.0);
                    seq += 1;
                    if b.len() == 10_000 {
                        let full = std::mem::take(&mut b).finish();
                        blocks.push((first, full.len() as u32, full.encode()));
                        first = seq;
                    }
                }
            }
            if !b.is_empty() {
                let last = b.finish();
                blocks.push((first, last.len() as u32, last.encode()));
            }
            for chunk in blocks.chunks(20) {
                let wire = chunk.iter().map(|(s, c, d)| WireBlock { first_seq: *s, count: *c, data: d }).collect();
                let body = Batch { agent_id: "gw-1", epoch: 1, blocks: wire }.to_postcard();
                let response = client
                    .post(format!("{base}/api/v1/ingest"))
                    .bearer_auth("t")
                    .header("content-type", "application/x-postcard")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(response.status().is_success(), "ingest answered {}", response.status());
            }
        }
        loop {
            let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
            let value =
                |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string));
            if value("tributary_processor_offset") == Some(seq.to_string()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    })?;
    println!(
        "loaded {seq} readings ({sensors} sensors x {DAYS} days x 1/min) and processed them in {:.1} s",
        loaded.elapsed().as_secs_f64()
    );

    let (s, e) = (start / 1000, end / 1000);
    let q = |query: &str| {
        query.replace('{', "%7B").replace('}', "%7D").replace('"', "%22").replace('[', "%5B").replace(']', "%5D")
    };
    let reads = [
        (
            "Grafana: query_range avg_over_time(...[5m]) over 30 days, step 5m (8,640 points)",
            format!(
                "/prometheus/api/v1/query_range?query={}&start={s}&end={e}&step=300",
                q(r#"avg_over_time(tributary_reading{sensor="site/s00001"}[5m])"#)
            ),
        ),
        (
            "Grafana: query_range avg_over_time(...[1h]) over 30 days, step 1h",
            format!(
                "/prometheus/api/v1/query_range?query={}&start={s}&end={e}&step=3600",
                q(r#"avg_over_time(tributary_reading{sensor="site/s00001"}[1h])"#)
            ),
        ),
        (
            "dashboard: one sensor's 30 days at 1,000 points (series)",
            format!("/api/v1/sensors/site%2Fs00001/series?from={start}&to={end}"),
        ),
        ("dashboard: the sensor list, first page of 500", "/api/v1/sensors?limit=500".to_string()),
        ("dashboard: the fleet view (agents)", "/api/v1/agents".to_string()),
    ];
    runtime.block_on(async {
        for (name, path) in &reads {
            let mut times = Vec::with_capacity(100);
            let mut bytes = 0;
            for _ in 0..100 {
                let t = Instant::now();
                let response = client.get(format!("{base}{path}")).send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                anyhow::ensure!(status.is_success(), "{path}: {status}: {}", String::from_utf8_lossy(&body));
                bytes = body.len();
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(f64::total_cmp);
            println!("{name}: p50 {:.1} ms, p99 {:.1} ms ({bytes} bytes)", times[50], times[98]);
        }
        anyhow::Ok(())
    })?;
    let _ = stop_tx.send(());
    runtime.block_on(server)??;
    Ok(())
}
