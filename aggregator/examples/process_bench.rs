//! The processing benchmark: loads a readings CSV (`sensor_id,ts,value`, as
//! `../shared/peers/processing/gen.py` writes it) into a real aggregator through its ingest API
//! (postcard batches from 4 senders, as agents send them), then times the pipeline folding the
//! whole log from offset 0 into a fresh store, and exports the 1-minute windows in the CSV shape
//! `check.py` reads.
//!
//! `cargo run --release -p tributary-aggregator --example process_bench -- READINGS.csv OUT.csv
//!  [PIPELINE] [sensor_prefix=s-]`; PIPELINE is a comma-separated list of window sizes (default
//! `1m`), or `full`: the default pipeline (10s, 1m, 1h), an anomaly model on every sensor and 10
//! alert rules. Prints one `RESULT {...}` JSON line. `tests/bench/processing.sh` runs it beside
//! DuckDB. `fold_s` (the rate's time) ends when the fold has committed everything; the store is
//! then still unsynced, its commits in the WAL, as a replay leaves it until it is synced.
//! `checkpoint_s` is the checkpoint of that WAL into the file (without fsync: work the fold left,
//! counted in `readings_per_s_with_checkpoint`), and `sync_s` the fsyncs after it.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use tributary_aggregator::config::{AgentConfig, PipelineConfig};
use tributary_aggregator::{Config, pipeline, store};
use tributary_shared::{Batch, BlockBuilder, WireBlock};

const SENDERS: usize = 4;

/// The allocator and options the aggregator binary runs with (src/main.rs), so that the memory
/// and timings are the binary's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:1,dirty_decay_ms:250,muzzy_decay_ms:0,background_thread:true\0";
const BLOCK: usize = 2_000;
const BLOCKS_PER_BATCH: usize = 10;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let input = args.next().context("usage: process_bench READINGS.csv OUT.csv [windows] [prefix]")?;
    let output = args.next().context("usage: process_bench READINGS.csv OUT.csv [windows] [prefix]")?;
    let pipeline = args.next().unwrap_or_else(|| "1m".into());
    let full = pipeline == "full";
    let windows: Vec<String> = if full {
        vec!["10s".into(), "1m".into(), "1h".into()]
    } else {
        pipeline.split(',').map(String::from).collect()
    };
    let prefix = args.next().unwrap_or_else(|| "s-".into());
    let _ = rustls_free();
    // PROCESS_BENCH_FOLD_LOG=path/log.db folds an existing log alone (to profile the fold), e.g.
    // one kept by PROCESS_BENCH_KEEP=1 (which leaves the run's data directory in place).
    if let Ok(log) = std::env::var("PROCESS_BENCH_FOLD_LOG") {
        let mut dir = tempfile::tempdir()?;
        if std::env::var_os("PROCESS_BENCH_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("keeping {}", dir.path().display());
        }
        let config = Config {
            pipeline: PipelineConfig { windows, ..PipelineConfig::default() },
            anomaly: if full { full_rules()?.anomaly } else { Vec::new() },
            alerts: if full { full_rules()?.alerts } else { Vec::new() },
            ..Config::loopback(dir.path(), Vec::new())
        };
        let started = Instant::now();
        let done =
            pipeline::processor::catch_up(Path::new(&log), &dir.path().join("store.db"), config.pipeline_spec(), 0)?;
        let fold_s = started.elapsed().as_secs_f64();
        let (checkpoint_s, sync_s) = sync_store(&dir.path().join("store.db"))?;
        // PROCESS_BENCH_CHECKSUM=1: the digest of the tables the fold wrote (the same for any
        // build that folds the same log to the same tables).
        let checksum = match std::env::var_os("PROCESS_BENCH_CHECKSUM") {
            Some(_) => {
                let conn = rusqlite::Connection::open(dir.path().join("store.db"))?;
                tributary_aggregator::versions::checksum(&conn)?.1
            }
            None => String::new(),
        };
        println!(
            "RESULT {}",
            serde_json::json!({"readings": done.folded, "fold_s": round(fold_s), "checkpoint_s": round(checkpoint_s),
            "sync_s": round(sync_s), "checksum": checksum,
            "readings_per_s": (done.folded as f64 / fold_s).round(),
            "fold_time_s": {"read_and_decode": round(done.timings.read.as_secs_f64()),
                "fold": round(done.timings.fold.as_secs_f64()), "commit": round(done.timings.commit.as_secs_f64()),
                "commits": done.timings.commits}})
        );
        return Ok(());
    }

    let readings = read_csv(Path::new(&input), &prefix)?;
    eprintln!("read {} readings from {input}", readings.len());
    let mut dir = tempfile::tempdir()?;
    if std::env::var_os("PROCESS_BENCH_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    let config = Config {
        pipeline: PipelineConfig { windows: windows.clone(), ..PipelineConfig::default() },
        anomaly: if full { full_rules()?.anomaly } else { Vec::new() },
        alerts: if full { full_rules()?.alerts } else { Vec::new() },
        ..Config::loopback(
            dir.path(),
            (0..SENDERS).map(|i| AgentConfig { id: format!("gw-{i}"), token: format!("t-{i}") }).collect(),
        )
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
    // The live processor folds while the batches arrive: when does the API count them all?
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let visible_s = runtime.block_on(async {
        while metric(&client, &base, "tributary_processor_offset").await? < readings.len() as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let visible_s = ingest_started.elapsed().as_secs_f64();
        // PROCESS_BENCH_HOLD=seconds keeps the loaded aggregator up to profile its queries from outside.
        if let Some(hold) = std::env::var("PROCESS_BENCH_HOLD").ok().and_then(|s| s.parse().ok()) {
            eprintln!("holding {base} for {hold} s");
            tokio::time::sleep(std::time::Duration::from_secs(hold)).await;
        }
        anyhow::Ok(visible_s)
    })?;
    let queries = time_queries(&base, &readings, &prefix)?;
    let _ = stop_tx.send(());
    runtime.block_on(server)??;
    drop(runtime);
    let sent = readings.len();
    drop(readings);

    // 2. Fold the whole log from offset 0 into a fresh store.
    let store_path = dir.path().join("replay.db");
    let spec = config.pipeline_spec();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let done = pipeline::processor::catch_up(&dir.path().join("log.db"), &store_path, spec.clone(), 0)?;
    let folded = done.folded;
    let fold_s = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let (checkpoint_s, sync_s) = sync_store(&store_path)?;

    // 3. Export the 1-minute windows.
    let exported = export(&store_path, &spec, &prefix, Path::new(&output))?;
    let log_bytes = std::fs::metadata(dir.path().join("log.db"))?.len();
    let store_bytes = std::fs::metadata(&store_path)?.len();
    let rows: (i64, f64, i64, i64) = rusqlite::Connection::open(&store_path)?.query_row(
        "SELECT (SELECT count(*) FROM windows), (SELECT avg(length(data)) FROM windows),
                (SELECT page_count FROM pragma_page_count()), (SELECT freelist_count FROM pragma_freelist_count())",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    println!(
        "RESULT {}",
        serde_json::json!({
            "readings": folded,
            "pipeline": if full { "full: 10s,1m,1h + anomaly model + 10 alert rules".to_string() } else { windows.join(",") },
            "ingest_s": round(ingest_s),
            "ingest_readings_per_s": (sent as f64 / ingest_s).round(),
            "live_visible_readings_per_s": (sent as f64 / visible_s).round(),
            "query_ms": queries,
            "fold_s": round(fold_s),
            "checkpoint_s": round(checkpoint_s),
            "sync_s": round(sync_s),
            "readings_per_s": (folded as f64 / fold_s).round(),
            "readings_per_s_with_checkpoint": (folded as f64 / (fold_s + checkpoint_s)).round(),
            "cpu_us_per_reading": round(cpu * 1e6 / folded as f64),
            "fold_time_s": {
                "read_and_decode": round(done.timings.read.as_secs_f64()),
                "fold": round(done.timings.fold.as_secs_f64()),
                "commit": round(done.timings.commit.as_secs_f64()),
                "commits": done.timings.commits,
            },
            // The whole bench process (the CSV in memory included): the aggregator's own RSS is
            // measured by tests/bench/live.sh on the real binary.
            "bench_process_peak_rss_mib": round(peak_rss_kib() as f64 / 1024.0),
            "log_bytes_per_reading": round(log_bytes as f64 / folded as f64),
            "store_bytes_per_reading": round(store_bytes as f64 / folded as f64),
            "store_window_rows": {"rows": rows.0, "avg_bytes": round(rows.1), "pages": rows.2, "free_pages": rows.3},
            "exported_windows": exported,
        })
    );
    Ok(())
}

/// A value from /metrics.
async fn metric(client: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<u64> {
    let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let value = text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')));
    Ok(value.context("metric missing")?.trim().parse()?)
}

/// p50/p99 of 100 runs of each query a dashboard makes on the store the live processor built,
/// timed by curl (`time_total`): a client in a
/// process of its own, as a browser is. A client in this process (reqwest, on the server's runtime
/// or a thread of its own) shared the server's allocator arena and cores and made the fleet read's
/// p99 70-80 ms where curl, against the same server, measured 40.
fn time_queries(base: &str, readings: &[(String, i64, f64)], prefix: &str) -> anyhow::Result<serde_json::Value> {
    let end = readings.iter().map(|r| r.1).max().context("no readings")?;
    let day_start = end - 86_400_000;
    let sensor = readings.first().map(|r| r.0.clone()).context("no readings")?;
    let sensors = readings.iter().map(|r| &r.0).collect::<std::collections::HashSet<_>>().len();
    let mut out = serde_json::Map::new();
    let cases = [
        ("one_sensor_day_of_1m", format!("/api/v1/sensors/{sensor}/windows?size=1m&from={day_start}&to={end}")),
        (
            "all_sensors_last_hour_of_1m",
            format!("/api/v1/windows?sensor={prefix}*&size=1m&from={}&to={end}", end - 3_600_000),
        ),
        (
            "all_sensors_last_hour_of_1m_chart_fields",
            format!(
                "/api/v1/windows?sensor={prefix}*&size=1m&from={}&to={end}&fields=start,min,max,mean",
                end - 3_600_000
            ),
        ),
        (
            "one_sensor_30_days_of_1h",
            format!("/api/v1/sensors/{sensor}/windows?size=1h&from={}&to={end}", end - 30 * 86_400_000),
        ),
        ("sensor_list", "/api/v1/sensors?limit=10000".to_string()),
    ];
    for (name, path) in cases {
        let mut times = Vec::with_capacity(100);
        let mut bytes = 0;
        for _ in 0..100 {
            let out = std::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total} %{size_download}"])
                .arg(format!("{base}{path}"))
                .output()
                .context("run curl (the bench times its queries with it)")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut fields = text.split_whitespace();
            let (code, secs, size) = (fields.next(), fields.next(), fields.next());
            anyhow::ensure!(code == Some("200"), "{path} answered {code:?}");
            times.push(secs.context("curl's time")?.parse::<f64>()? * 1e3);
            bytes = size.context("curl's size")?.parse::<usize>()?;
        }
        times.sort_by(f64::total_cmp);
        out.insert(
            name.to_string(),
            serde_json::json!({"p50": round(times[49]), "p99": round(times[98]), "bytes": bytes}),
        );
    }
    out.insert("sensors".into(), sensors.into());
    Ok(serde_json::Value::Object(out))
}

/// The full pipeline's rules: a MAD model on every sensor and 10 alert rules of every kind.
fn full_rules() -> anyhow::Result<Config> {
    let mut text = String::from("[[anomaly]]\nsensor = \"**\"\n");
    for (i, condition) in [
        "above = 90.0",
        "above = 95.0\nfor = \"5m\"\nclear = 80.0",
        "below = -50.0",
        "below = 0.0\nfor = \"1m\"",
        "rate_above = 5.0",
        "rate_below = -5.0",
        "anomaly = true",
        "above = 99.0\nseverity = \"critical\"",
        "below = -90.0\nseverity = \"critical\"",
        "rate_above = 50.0\nseverity = \"critical\"",
    ]
    .iter()
    .enumerate()
    {
        text.push_str(&format!("[[alerts]]\nname = \"rule{i}\"\nsensor = \"**\"\n{condition}\n"));
    }
    parse_rules(&text)
}

fn parse_rules(rules: &str) -> anyhow::Result<Config> {
    let text = format!("data_dir = \"/tmp\"\n[[agents]]\nid = \"x\"\ntoken = \"x\"\n{rules}");
    Ok(Config::parse(&text, Path::new("process_bench rules"))?)
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
    // Derived streams (`_anomaly/...`, `_alert/...`) are not part of the workload's answer.
    for (series, name) in store::series_with_prefix(&conn, prefix)? {
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

/// Syncs a store the fold built without fsync, as a replayed version's store is synced before it
/// serves. Returns the seconds the checkpoint of its WAL (where the fold left its commits) into
/// the file took, without fsync (work the fold left), and then those of the rest: the fsyncs.
fn sync_store(path: &Path) -> anyhow::Result<(f64, f64)> {
    let conn = store::open_write(path)?;
    store::write_unsynced(&conn, true)?;
    let started = Instant::now();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let checkpoint_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    store::end_unsynced(&[&conn], path)?;
    Ok((checkpoint_s, started.elapsed().as_secs_f64()))
}
