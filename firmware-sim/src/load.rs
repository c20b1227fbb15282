//! `tributary-sim load`: the aggregator's ingest load generator.
//!
//! Everything is encoded before the clock starts: readings from the signal models, packed into
//! blocks and batches exactly as an agent would send them. Then `--connections` tasks each POST
//! their own stream of batches, one at a time, waiting for each ack. Every stream has its own
//! random epoch with sequence numbers from 0, because the aggregator deduplicates by
//! (agent, epoch, seq) and expects each epoch in order.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use tokio::task::JoinSet;
use tributary_shared::batch::{JSON_CONTENT_TYPE, POSTCARD_CONTENT_TYPE};
use tributary_shared::{Batch, BlockBuilder, IngestAck, WireBlock};

use crate::device::Device;
use crate::signal::{Noise, Quantity};

/// Where the aggregator takes batches, below `--url`.
const INGEST_PATH: &str = "/api/v1/ingest";

#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// The aggregator's base URL (or its full ingest URL).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Agent id the batches claim to come from.
    #[arg(long, default_value = "gw-1")]
    pub agent_id: String,
    /// Bearer token of that agent.
    #[arg(long, default_value = "secret-gw-1")]
    pub token: String,
    /// Readings to send in total.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub readings: u64,
    /// Readings per block.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..))]
    pub block: u32,
    /// Blocks per POSTed batch.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub blocks_per_batch: u32,
    /// Concurrent POSTs; each connection sends its own epoch, in order.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
    /// Distinct sensors (`dev-<n>/<quantity>`, three per simulated device).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub sensors: u32,
    /// Seed of the signal models.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Readings per second to offer in total (spread over the connections); without it, as
    /// fast as the acks come back. A steady rate shows whether the processor keeps up with it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
    /// The readings' event times end this many seconds before now (a run that follows in time
    /// the one before it, rather than covering the same hours again).
    #[arg(long, default_value_t = 0)]
    pub ago_s: u64,
    /// Milliseconds of event time between a sensor's readings. With `--rate`, a period of
    /// sensors × 1000 / rate makes event time pass as fast as the wall clock (a live fleet);
    /// the default second makes a fast run a backlog, hours of readings in a minute.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub period_ms: u32,
}

impl LoadArgs {
    fn ingest_url(&self) -> String {
        let base = self.url.trim_end_matches('/');
        if base.ends_with(INGEST_PATH) { base.to_string() } else { format!("{base}{INGEST_PATH}") }
    }
}

/// One POST body, ready to send.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    pub body: Bytes,
    pub first_seq: u64,
    pub readings: u64,
}

/// The batches of one connection: one epoch, sequences contiguous from 0.
#[derive(Debug, Clone)]
pub struct Stream {
    pub epoch: u64,
    pub batches: Vec<PreparedBatch>,
}

/// All the traffic of a run, encoded.
#[derive(Debug, Clone)]
pub struct Plan {
    pub streams: Vec<Stream>,
    pub readings: u64,
    pub batches: u64,
    pub body_bytes: u64,
}

/// Readings of a simulated fleet in time order: every sensor reports once per period, the devices
/// spread over the period with a hundredth of it as jitter, the last reading at `end_ms`.
struct Fleet {
    devices: Vec<Device>,
    /// Sensor ids of each device (three, or fewer for the last one).
    ids: Vec<Vec<String>>,
    jitter: Noise,
    start_ms: i64,
    tick: i64,
    period_ms: i64,
}

impl Fleet {
    fn new(sensors: u32, readings: u64, seed: u64, end_ms: i64, period_ms: u32) -> Self {
        let period_ms = i64::from(period_ms);
        let per_device = Quantity::ALL.len() as u32;
        let device_count = sensors.div_ceil(per_device);
        let devices: Vec<Device> = (1..=device_count).map(|n| Device::new(n, seed)).collect();
        let ids = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let here = (sensors - i as u32 * per_device).min(per_device) as usize;
                Quantity::ALL[..here].iter().map(|q| format!("{}/{}", d.id(), q.name())).collect()
            })
            .collect();
        let ticks = readings.div_ceil(u64::from(sensors)) as i64;
        Fleet {
            devices,
            ids,
            jitter: Noise::new(seed ^ 0x6A09_E667_F3BC_C908),
            start_ms: end_ms - ticks * period_ms,
            tick: 0,
            period_ms,
        }
    }

    /// Pushes one period of readings (every sensor once) into `out`, at most `limit` of them.
    fn next_second(&mut self, out: &mut BlockSink, limit: u64) -> u64 {
        let mut pushed = 0;
        let count = self.devices.len() as i64;
        for (i, (device, ids)) in self.devices.iter_mut().zip(&self.ids).enumerate() {
            let slot = self.start_ms + self.tick * self.period_ms + i as i64 * self.period_ms / count;
            // A hundredth of the period (10 ms of a second): readings a little out of order.
            let ts = slot + (self.jitter.uniform() * self.period_ms as f64 / 100.0) as i64;
            let sample = device.sample(ts);
            for (q, id) in Quantity::ALL.iter().zip(ids) {
                if pushed == limit {
                    return pushed;
                }
                // What the agent gets from an MQTT payload: the value at the sensor's resolution.
                let scale = 10f64.powi(q.decimals() as i32);
                out.push(id, ts, (sample.get(*q) * scale).round() / scale);
                pushed += 1;
            }
        }
        self.tick += 1;
        pushed
    }
}

/// Cuts readings into blocks and blocks into batches, handing batches to the streams in turn.
struct BlockSink {
    builder: BlockBuilder,
    block_size: usize,
    blocks_per_batch: usize,
    agent_id: String,
    pending: Vec<(u32, Vec<u8>)>,
    streams: Vec<Stream>,
    next_seq: Vec<u64>,
    batches: u64,
    body_bytes: u64,
}

impl BlockSink {
    fn push(&mut self, sensor: &str, ts: i64, value: f64) {
        self.builder.push(sensor, ts, value);
        if self.builder.len() == self.block_size {
            self.cut_block();
        }
    }

    fn cut_block(&mut self) {
        if self.builder.is_empty() {
            return;
        }
        let block = self.builder.take();
        self.pending.push((block.len() as u32, block.encode()));
        if self.pending.len() == self.blocks_per_batch {
            self.cut_batch();
        }
    }

    fn cut_batch(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let s = (self.batches % self.streams.len() as u64) as usize;
        let stream = &mut self.streams[s];
        let first_seq = self.next_seq[s];
        let mut seq = first_seq;
        let blocks = self
            .pending
            .iter()
            .map(|(count, data)| {
                let block = WireBlock { first_seq: seq, count: *count, data };
                seq += u64::from(*count);
                block
            })
            .collect();
        let body = Batch { agent_id: &self.agent_id, epoch: stream.epoch, blocks }.to_postcard();
        self.body_bytes += body.len() as u64;
        stream.batches.push(PreparedBatch { body: body.into(), first_seq, readings: seq - first_seq });
        self.next_seq[s] = seq;
        self.batches += 1;
        self.pending.clear();
    }
}

/// Encodes a run's batches; the last reading is stamped `end_ms` (about now).
pub fn prepare(args: &LoadArgs, end_ms: i64) -> anyhow::Result<Plan> {
    let mut epochs: Vec<u64> = Vec::with_capacity(args.connections as usize);
    while epochs.len() < args.connections as usize {
        // 63 bits, like the agent's spool epochs: the aggregator stores them as SQLite integers.
        let epoch = getrandom::u64().map_err(|e| anyhow::anyhow!("no system randomness for the epochs: {e}"))? >> 1;
        if !epochs.contains(&epoch) {
            epochs.push(epoch);
        }
    }
    let mut sink = BlockSink {
        builder: BlockBuilder::default(),
        block_size: args.block as usize,
        blocks_per_batch: args.blocks_per_batch as usize,
        agent_id: args.agent_id.clone(),
        pending: Vec::new(),
        next_seq: vec![0; epochs.len()],
        streams: epochs.into_iter().map(|epoch| Stream { epoch, batches: Vec::new() }).collect(),
        batches: 0,
        body_bytes: 0,
    };
    let mut fleet = Fleet::new(args.sensors, args.readings, args.seed, end_ms, args.period_ms);
    let mut left = args.readings;
    while left > 0 {
        left -= fleet.next_second(&mut sink, left);
    }
    sink.cut_block();
    sink.cut_batch();
    Ok(Plan { readings: args.readings, batches: sink.batches, body_bytes: sink.body_bytes, streams: sink.streams })
}

/// What a run achieved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub readings: u64,
    pub batches: u64,
    pub body_bytes: u64,
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { self.readings as f64 / secs } else { 0.0 };
        write!(
            f,
            "ingested {} readings in {:.3} s: {:.0} readings/s ({} batches, {:.2} B/reading on the wire)",
            self.readings,
            secs,
            rate,
            self.batches,
            self.body_bytes as f64 / self.readings.max(1) as f64
        )
    }
}

/// reqwest is built with `rustls-no-provider` and panics when a client is built without a
/// process-wide provider, even for plain http://. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Prepares the batches, then sends them and checks every ack.
pub async fn run(args: &LoadArgs) -> anyhow::Result<Report> {
    install_crypto_provider();
    let url = args.ingest_url();
    let prepare_start = Instant::now();
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let end_ms = now_ms.saturating_sub(i64::try_from(args.ago_s.saturating_mul(1000)).unwrap_or(i64::MAX));
    // CPU-bound but before any other task exists: nothing waits on this thread.
    let plan = prepare(args, end_ms)?;
    tracing::info!(
        readings = plan.readings, batches = plan.batches, bytes = plan.body_bytes,
        took = ?prepare_start.elapsed(), "batches encoded; sending"
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections as usize)
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let auth =
        HeaderValue::from_str(&format!("Bearer {}", args.token)).context("--token is not a valid header value")?;

    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let streams = plan.streams.len().max(1) as f64;
    for stream in plan.streams {
        let pace = args.rate.map(|rate| Pace { start: tokio::time::Instant::now(), per_s: rate as f64 / streams });
        tasks.spawn(send_stream(client.clone(), url.clone(), auth.clone(), stream, pace));
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.context("a sending task panicked").and_then(|sent| sent) {
            tasks.abort_all();
            return Err(e);
        }
    }
    Ok(Report { readings: plan.readings, batches: plan.batches, body_bytes: plan.body_bytes, elapsed: start.elapsed() })
}

/// A stream's share of `--rate`: batch k leaves no earlier than its readings' due time.
#[derive(Debug, Clone, Copy)]
struct Pace {
    start: tokio::time::Instant,
    per_s: f64,
}

/// POSTs one epoch's batches in order, each after the previous one was acked (and, with a
/// pace, not before it is due).
async fn send_stream(
    client: reqwest::Client,
    url: String,
    auth: HeaderValue,
    stream: Stream,
    pace: Option<Pace>,
) -> anyhow::Result<()> {
    let mut sent = 0u64;
    for batch in stream.batches {
        if let Some(pace) = pace {
            tokio::time::sleep_until(pace.start + Duration::from_secs_f64(sent as f64 / pace.per_s)).await;
        }
        sent += batch.readings;
        let end_seq = batch.first_seq + batch.readings;
        let what = format!("batch of epoch {:016x}, seq {}..{}", stream.epoch, batch.first_seq, end_seq);
        let response = client
            .post(&url)
            .header(CONTENT_TYPE, POSTCARD_CONTENT_TYPE)
            .header(reqwest::header::AUTHORIZATION, auth.clone())
            .body(batch.body)
            .send()
            .await
            .with_context(|| format!("POST {url} ({what})"))?;
        let status = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = response.bytes().await.with_context(|| format!("reading the reply to {what}"))?;
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned();
            bail!("{url} answered {status} to {what}: {}", text.trim());
        }
        let ack =
            decode_ack(&content_type, &body).with_context(|| format!("the reply to {what} is not an IngestAck"))?;
        ensure!(
            ack.accepted == batch.readings,
            "{url} accepted {} of the {} readings of {what} ({} duplicates, next_seq {})",
            ack.accepted,
            batch.readings,
            ack.duplicates,
            ack.next_seq
        );
    }
    Ok(())
}

/// The ack comes as JSON or postcard, as the content type says.
fn decode_ack(content_type: &str, body: &[u8]) -> anyhow::Result<IngestAck> {
    if content_type.starts_with(JSON_CONTENT_TYPE) {
        Ok(serde_json::from_slice(body)?)
    } else {
        Ok(postcard::from_bytes(body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use tributary_shared::Block;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadArgs,
    }

    fn args(flags: &[&str]) -> LoadArgs {
        Cli::parse_from(std::iter::once("load").chain(flags.iter().copied())).args
    }

    #[test]
    fn the_plan_numbers_every_epoch_from_zero_without_gaps() {
        let args = args(&[
            "--readings",
            "10007",
            "--block",
            "1000",
            "--blocks-per-batch",
            "3",
            "--connections",
            "3",
            "--sensors",
            "7",
        ]);
        let end = 1_764_000_000_000;
        let plan = prepare(&args, end).unwrap();
        assert_eq!(plan.batches, 4); // 11 blocks in batches of 3
        let mut total = 0;
        let mut sensors = std::collections::BTreeSet::new();
        for stream in &plan.streams {
            let mut next = 0;
            for prepared in &stream.batches {
                let batch = Batch::from_postcard(&prepared.body).unwrap();
                assert_eq!((batch.agent_id, batch.epoch), ("gw-1", stream.epoch));
                assert!(i64::try_from(batch.epoch).is_ok(), "epochs are 63-bit");
                assert_eq!(prepared.first_seq, next);
                for wire in &batch.blocks {
                    assert_eq!(wire.first_seq, next);
                    let block: Block = wire.decode().unwrap();
                    block.validate().unwrap();
                    for (sensor, ts, _) in block.readings() {
                        assert!(ts <= end + 10 && ts > end - 1_500 * 1000, "{ts}");
                        sensors.insert(sensor.to_string());
                    }
                    next += u64::from(wire.count);
                }
                assert_eq!(next - prepared.first_seq, prepared.readings);
            }
            total += next;
        }
        assert_eq!(total, 10007);
        assert_eq!(sensors.len(), 7);
        assert!(sensors.contains("dev-3/temperature") && !sensors.contains("dev-3/humidity"));
    }

    #[test]
    fn the_ingest_url_is_found_below_the_base() {
        assert_eq!(args(&[]).ingest_url(), "http://127.0.0.1:8080/api/v1/ingest");
        assert_eq!(args(&["--url", "http://h:1/"]).ingest_url(), "http://h:1/api/v1/ingest");
        assert_eq!(args(&["--url", "http://h:1/api/v1/ingest"]).ingest_url(), "http://h:1/api/v1/ingest");
    }

    #[test]
    fn acks_decode_from_json_and_postcard() {
        let ack = IngestAck { accepted: 5, duplicates: 0, next_seq: 5, missing: 0 };
        assert_eq!(decode_ack("application/json", &serde_json::to_vec(&ack).unwrap()).unwrap(), ack);
        assert_eq!(decode_ack(POSTCARD_CONTENT_TYPE, &postcard::to_allocvec(&ack).unwrap()).unwrap(), ack);
        assert!(decode_ack("application/json", b"nope").is_err());
    }
}
