//! The processing benchmark: loads a readings CSV (`sensor_id,ts,value`, as
//! `../shared/peers/processing/gen.py` writes it) into a real aggregator through its ingest API
//! (postcard batches from 4 senders, as agents send them), then times the pipeline folding the
//! whole log from offset 0 into a fresh store, and exports the 1-minute windows in the CSV shape
//! `check.py` reads.
//!
//! `cargo run --release -p tributary-aggregator --example process_bench -- READINGS.csv OUT.csv
//!  [windows=1m] [sensor_prefix=s-]`; `windows` is a comma-separated list (`10s,1m,1h`).
//! Prints one `RESULT {...}` JSON line. `tests/bench/processing.sh` runs it beside DuckDB.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tributary_aggregator::config::{AgentConfig, HttpConfig, PipelineConfig};
use tributary_aggregator::{Config, pipeline, store};
use tributary_shared::{Batch, BlockBuilder, WireBlock};

const SENDERS: usize = 4;
const BLOCK: usize = 2_000;
const BLOCKS_PER_BATCH: usize = 10;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let input = args.next().context("usage: process_bench READINGS.csv OUT.csv [windows] [prefix]")?;
    let output = args.next().context("usage: process_bench READINGS.csv OUT.csv [windows] [prefix]")?;
    let windows: Vec<String> = args.next().unwrap_or_else(|| "1m".into()).split(',').map(String::from).collect();
    let prefix = args.next().unwrap_or_else(|| "s-".into());
    let _ = rustls_free();

    let readings = read_csv(Path::new(&input), &prefix)?;
    eprintln!("read {} readings from {input}", readings.len());
    let dir = tempfile::tempdir()?;
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        http: HttpConfig { listen: "127.0.0.1:0".parse()? },
        agents: (0..SENDERS).map(|i| AgentConfig { id: format!("gw-{i}"), token: format!("t-{i}") }).collect(),
        pipeline: PipelineConfig { windows: windows.clone(), ..PipelineConfig::default() },
        anomaly: Vec::new(),
        alerts: Vec::new(),
        notify: Vec::new(),
    };

    // 1. Ingest through HTTP into a running aggregator.
    let ingest_started = Instant::now();
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(tributary_aggregator::serve(config.clone(), listener, async {
        let _ = stop_rx.await;
    }));
    // Sender k sends batches k, k+4, ...: the log keeps roughly the file's order.
    let bodies: Vec<Vec<Vec<u8>>> = (0..SENDERS)
        .map(|sender| {
            let mut seq = 0u64;
            readings
                .chunks(BLOCK * BLOCKS_PER_BATCH)
                .enumerate()
                .filter(|(i, _)| i % SENDERS == sender)
                .map(|(_, chunk)| batch(sender, &mut seq, chunk))
                .collect()
        })
        .collect();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for (sender, mine) in bodies.into_iter().enumerate() {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for body in mine {
                    let response = client
                        .post(format!("http://{addr}/api/v1/ingest"))
                        .bearer_auth(format!("t-{sender}"))
                        .header("content-type", "application/x-postcard")
                        .body(body)
                        .send()
                        .await?;
                    anyhow::ensure!(response.status().is_success(), "ingest answered {}", response.status());
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })?;
    let ingest_s = ingest_started.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    runtime.block_on(server)??;
    drop(runtime);

    // 2. Fold the whole log from offset 0 into a fresh store.
    let store_path = dir.path().join("replay.db");
    let spec = config.pipeline_spec();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let folded = pipeline::processor::catch_up(&dir.path().join("log.db"), &store_path, spec.clone())?;
    let fold_s = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;

    // 3. Export the 1-minute windows.
    let exported = export(&store_path, &spec, &prefix, Path::new(&output))?;
    let log_bytes = std::fs::metadata(dir.path().join("log.db"))?.len();
    let store_bytes = std::fs::metadata(&store_path)?.len();
    println!(
        "RESULT {}",
        serde_json::json!({
            "readings": folded,
            "windows": windows,
            "ingest_s": round(ingest_s),
            "ingest_readings_per_s": (readings.len() as f64 / ingest_s).round(),
            "fold_s": round(fold_s),
            "readings_per_s": (folded as f64 / fold_s).round(),
            "cpu_us_per_reading": round(cpu * 1e6 / folded as f64),
            "peak_rss_mib": round(peak_rss_kib() as f64 / 1024.0),
            "log_bytes_per_reading": round(log_bytes as f64 / folded as f64),
            "store_bytes_per_reading": round(store_bytes as f64 / folded as f64),
            "exported_windows": exported,
        })
    );
    Ok(())
}

fn rustls_free() -> Result<(), ()> {
    // reqwest is built without a TLS provider: every URL here is plain http.
    rustls::crypto::ring::default_provider().install_default().map_err(|_| ())
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn read_csv(path: &Path, prefix: &str) -> anyhow::Result<Vec<(String, i64, f64)>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if i == 0 {
            continue;
        }
        let mut fields = line.split(',');
        let (Some(sensor), Some(ts), Some(value)) = (fields.next(), fields.next(), fields.next()) else {
            anyhow::bail!("line {}: expected sensor_id,ts,value", i + 1);
        };
        out.push((format!("{prefix}{sensor}"), ts.parse()?, value.parse()?));
    }
    Ok(out)
}

/// A postcard batch of `readings` in blocks of [`BLOCK`], numbered from `seq`.
fn batch(sender: usize, seq: &mut u64, readings: &[(String, i64, f64)]) -> Vec<u8> {
    let encoded: Vec<(u64, u32, Vec<u8>)> = readings
        .chunks(BLOCK)
        .map(|chunk| {
            let mut b = BlockBuilder::default();
            for (sensor, ts, value) in chunk {
                b.push(sensor, *ts, *value);
            }
            let first = *seq;
            *seq += chunk.len() as u64;
            (first, chunk.len() as u32, b.finish().encode())
        })
        .collect();
    let agent = format!("gw-{sender}");
    let blocks = encoded
        .iter()
        .map(|(first_seq, count, data)| WireBlock { first_seq: *first_seq, count: *count, data })
        .collect();
    Batch { agent_id: &agent, epoch: 1, blocks }.to_postcard()
}

/// Writes `sensor_id,window_start,count,min,max,mean` for every 1-minute window.
fn export(store_path: &Path, spec: &pipeline::PipelineSpec, prefix: &str, out: &Path) -> anyhow::Result<u64> {
    let Some(calendar) = spec.calendars.iter().find(|c| c.code() == 60_000) else {
        return Ok(0);
    };
    let conn = rusqlite::Connection::open(store_path)?;
    let mut file = BufWriter::new(std::fs::File::create(out)?);
    writeln!(file, "sensor_id,window_start,count,min,max,mean")?;
    let mut n = 0;
    for (series, name) in store::series_with_prefix(&conn, "")? {
        let id = name.strip_prefix(prefix).unwrap_or(&name);
        for (index, w) in store::windows(&conn, calendar, series, i64::MIN / 120_000, i64::MAX / 120_000)? {
            let s = &w.stats;
            writeln!(file, "{id},{},{},{},{},{}", calendar.start_of(index), s.count, s.min, s.max, s.mean())?;
            n += 1;
        }
    }
    file.flush()?;
    Ok(n)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
