//! Quick self-check of ingest and processing throughput (the official benchmark is
//! `tributary-sim load`). Runs the aggregator in-process on a temporary data dir and posts
//! postcard batches from several agent threads over loopback.
//!
//! `cargo run --release -p tributary-aggregator --example ingest_bench -- [readings] [agents]
//! [readings per block] [blocks per batch]`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tributary_aggregator::{AgentConfig, Config};
use tributary_shared::{Batch, BlockBuilder, WireBlock};

const SENSORS: usize = 200;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2_000_000);
    let agents: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let block: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2_000);
    let per_batch: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let dir = tempfile::tempdir()?;
    let config = Config::loopback(
        dir.path(),
        (0..agents).map(|i| AgentConfig { id: format!("gw-{i}"), token: format!("t-{i}") }).collect(),
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(tributary_aggregator::serve(config, listener, async {
        let _ = stop_rx.await;
    }));

    // Encode everything first so the clients measure the server, not themselves.
    let per_agent = total / agents;
    let bodies: Vec<Vec<Vec<u8>>> =
        (0..agents).map(|a| batches(&format!("gw-{a}"), per_agent, block, per_batch)).collect();
    let start = Instant::now();
    std::thread::scope(|s| {
        for (a, bodies) in bodies.iter().enumerate() {
            s.spawn(move || {
                for body in bodies {
                    let (status, text) = post(addr, &format!("t-{a}"), body);
                    assert_eq!(status, 200, "{text}");
                }
            });
        }
    });
    let ingest = start.elapsed();
    let ingested = per_agent * agents;
    println!(
        "ingest: {ingested} readings in {:.2} s = {:.0} readings/s (acked, synchronous=FULL)",
        ingest.as_secs_f64(),
        ingested as f64 / ingest.as_secs_f64()
    );
    loop {
        let metrics = get(addr, "/metrics");
        let value = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(-1.0)
        };
        if value("tributary_processor_offset ") >= ingested as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let processed = start.elapsed();
    println!(
        "processed: all {ingested} readings {:.2} s after the start ({:.0} readings/s end to end)",
        processed.as_secs_f64(),
        ingested as f64 / processed.as_secs_f64()
    );
    let log_bytes = std::fs::metadata(dir.path().join("log.db"))?.len()
        + std::fs::metadata(dir.path().join("log.db-wal")).map(|m| m.len()).unwrap_or(0);
    println!("log.db (+wal): {:.1} B per reading", log_bytes as f64 / ingested as f64);
    let _ = stop_tx.send(());
    runtime.block_on(server)??;
    Ok(())
}

fn batches(agent: &str, n: usize, block: usize, per_batch: usize) -> Vec<Vec<u8>> {
    let t0 = 1_764_000_000_000i64;
    let mut out = Vec::new();
    let mut seq = 0usize;
    while seq < n {
        let mut blocks = Vec::new();
        for _ in 0..per_batch {
            if seq >= n {
                break;
            }
            let len = block.min(n - seq);
            let mut b = BlockBuilder::default();
            for i in seq..seq + len {
                let sensor = format!("site/room{}/temp", i % SENSORS);
                // Noisy values, so blocks compress like real measurements, not like constants.
                let noise = (i as f64 * 0.618_033_988_7).fract();
                b.push(&sensor, t0 + (i / SENSORS) as i64 * 1000, 20.0 + noise * 3.0);
            }
            blocks.push((seq as u64, len as u32, b.finish().encode()));
            seq += len;
        }
        let batch = Batch {
            agent_id: agent,
            epoch: 1,
            blocks: blocks.iter().map(|(s, c, d)| WireBlock { first_seq: *s, count: *c, data: d }).collect(),
        };
        out.push(batch.to_postcard());
    }
    out
}

fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(request).expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

fn post(addr: SocketAddr, token: &str, body: &[u8]) -> (u16, String) {
    let mut request = format!(
        "POST /api/v1/ingest HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/x-postcard\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let response = exchange(addr, &request);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response)
}

fn get(addr: SocketAddr, path: &str) -> String {
    exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
}
