//! `tributary-sim serial`: plays simulated devices over a serial port, as sensors wired to a
//! gateway's UART would, and injects the faults a UART sees.
//!
//! The devices share one port (a bus, or a hub MCU forwarding its sensors). Every tick each device
//! samples, encodes the sample ([`crate::uart`]) into the port's fixed-size [`Outbox`], and the
//! outbox is written to the port, paced to the baud rate (10 bits a byte) unless `--unpaced`:
//! a pseudo-terminal would otherwise take bytes at memory speed.
//!
//! Faults, each with a rate: corrupted or lost bytes (one per affected frame or line, never the
//! delimiter, so each bad frame costs only itself), stuck sensors, spikes, clock drift, bursts, and
//! unplugging (the port is closed for `--unplug-for`). `--record FILE` writes what was sent, one
//! JSON object per frame or line, so a test can compare it with what arrived; a frame counts as
//! sent once all its bytes were written to the port.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::time::{MissedTickBehavior, interval};
use tokio_serial::SerialPortBuilderExt;
use tributary_shared::frame::MAX_ENCODED_LEN;

use crate::device::{Device, Sample};
use crate::mqtt::parse_interval;
use crate::shutdown::Shutdown;
use crate::signal::Quantity;
use crate::uart::{LINE_CAPACITY, Outbox, quantized, sensor_id, write_frame, write_line, write_number_line};

/// The port's outbox: a burst of every device's frames fits, as in a gateway-side MCU's RAM.
const OUTBOX_BYTES: usize = 16 * 1024;

/// Samples a burst sends at once (a device flushing its backlog).
const BURST_SAMPLES: u32 = 10;

/// Samples a stuck sensor repeats its value for.
const STUCK_SAMPLES: u32 = 20;

/// How often a port that went away is tried again.
const REOPEN_EVERY: Duration = Duration::from_millis(100);

/// Bytes written between two pacing pauses.
const PACE_CHUNK: usize = 64;

/// How far writing may lag the wire rate before the lag is forgiven (the wire was idle).
const PACE_SLACK: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SerialFormat {
    /// Binary frames with a CRC (the agent's `format = "frames"`), three readings each.
    Frames,
    /// Text lines `dev-<n>/temperature=21.53,dev-<n>/humidity=40.2,...` (`format = "lines"`).
    Lines,
    /// The bare temperature per line, `21.53` (`format = "lines"`; the agent names it).
    Number,
}

impl SerialFormat {
    fn unit(self) -> &'static str {
        match self {
            SerialFormat::Frames => "frames",
            SerialFormat::Lines | SerialFormat::Number => "lines",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct SerialArgs {
    /// The serial device to write to, e.g. one end of a `socat` pseudo-terminal pair.
    #[arg(long)]
    pub port: PathBuf,
    /// Baud rate: set on the port, and the pace of writes.
    #[arg(long, default_value_t = 115_200, value_parser = clap::value_parser!(u32).range(1..))]
    pub baud: u32,
    #[arg(long, value_enum, default_value_t = SerialFormat::Frames)]
    pub format: SerialFormat,
    /// Simulated devices sharing the port, numbered from 1 (sensor ids `dev-<n>/<quantity>`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,
    /// Time between two samples of a device (humantime: 1s, 100ms); 0 sends as fast as the port takes.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Samples per device; 0 runs until Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Seed of the signal models and of the faults: the same seed plays the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Frames without timestamps: the devices have no clock, the agent stamps its receive time.
    #[arg(long)]
    pub no_clock: bool,
    /// Write as fast as the port takes bytes, instead of at the baud rate.
    #[arg(long)]
    pub unpaced: bool,
    /// Chance per frame or line that one of its bytes is corrupted.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub corrupt_rate: f64,
    /// Chance per frame or line that one of its bytes is lost.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub drop_rate: f64,
    /// Chance per sample that a device's sensors get stuck, repeating their values for 20 samples.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub stuck_rate: f64,
    /// Chance per reading of a spike: a jump of a quarter of the sensor's range.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub spike_rate: f64,
    /// The devices' clocks run fast (positive) or slow by this many parts per million.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub clock_drift_ppm: f64,
    /// Chance per tick that a device sends a burst: 10 samples at once, as after a backlog.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub burst_rate: f64,
    /// Chance per tick that the device is unplugged: the port is closed for --unplug-for.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub unplug_rate: f64,
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub unplug_for: Duration,
    /// Record every frame or line, one JSON object a line: {"device", "fault", "readings":
    /// [{"sensor", "ts", "value"}]}. fault: "none", "corrupt", "drop", "outbox_full" or
    /// "unplugged" (not written); ts is null where the agent stamps its receive time; sensor is
    /// "" for `--format number` (the agent names a bare number after its port or sensor_prefix).
    #[arg(long)]
    pub record: Option<PathBuf>,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("{s:?} is not a rate between 0 and 1")),
    }
}

/// What a run sent, by fate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    pub unit: &'static str,
    /// Frames or lines made.
    pub sent: u64,
    pub readings: u64,
    /// Written whole and unharmed: the agent must take every one.
    pub intact: u64,
    pub intact_readings: u64,
    pub corrupted: u64,
    pub dropped_byte: u64,
    pub outbox_full: u64,
    /// Made while the port was closed or gone, or cut by its going away.
    pub unplugged: u64,
    pub unplugs: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { self.intact_readings as f64 / secs } else { 0.0 };
        write!(
            f,
            "sent {} {} ({} readings) in {:.3} s: {} intact ({} readings), {} corrupted, {} with a byte lost, \
             {} dropped (outbox full), {} lost to {} unplugs; {} bytes, {:.0} readings/s",
            self.sent,
            self.unit,
            self.readings,
            secs,
            self.intact,
            self.intact_readings,
            self.corrupted,
            self.dropped_byte,
            self.outbox_full,
            self.unplugged,
            self.unplugs,
            self.bytes,
            rate
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Corrupt,
    Drop,
    OutboxFull,
    Unplugged,
}

impl Fault {
    fn label(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Corrupt => "corrupt",
            Fault::Drop => "drop",
            Fault::OutboxFull => "outbox_full",
            Fault::Unplugged => "unplugged",
        }
    }
}

/// One frame or line and what it carried, for the report and the record.
struct Sent {
    device: u32,
    fault: Fault,
    /// (sensor id, device timestamp if sent, value)
    readings: Vec<(String, Option<i64>, f64)>,
}

/// A device and its fault state.
struct SimDevice {
    device: Device,
    /// Samples left to repeat, and the values they repeat.
    stuck: Option<(u32, Sample)>,
}

/// The port, with the pace of its writes.
struct Port {
    stream: Option<tokio_serial::SerialStream>,
    /// When the bytes written so far will have left the wire.
    paced_until: tokio::time::Instant,
}

/// Runs the devices until each has sent `--count` samples, or until `shutdown`.
pub async fn run(args: &SerialArgs, mut shutdown: Shutdown) -> anyhow::Result<Report> {
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut devices: Vec<SimDevice> =
        (1..=args.devices).map(|n| SimDevice { device: Device::new(n, args.seed), stuck: None }).collect();
    let mut record = match &args.record {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("--record {}", path.display()))?,
        )),
        None => None,
    };
    let mut report = Report { unit: args.format.unit(), ..Report::default() };
    let mut port = Port { stream: None, paced_until: tokio::time::Instant::now() };
    port.open(args).with_context(|| format!("--port {}", args.port.display()))?;
    tracing::info!(port = %args.port.display(), baud = args.baud, format = ?args.format, devices = args.devices, "playing devices over serial");

    let mut outbox = Outbox::<OUTBOX_BYTES>::new();
    // Frames in the outbox, oldest first, with their length: recorded once written whole.
    let mut queued: VecDeque<(usize, Sent)> = VecDeque::new();
    let mut ticker = (!args.interval.is_zero()).then(|| {
        let mut ticker = interval(args.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    let start = Instant::now();
    let start_ms = now_ms();
    let mut unplugged_until: Option<tokio::time::Instant> = None;
    let mut scratch = [0u8; MAX_ENCODED_LEN];
    let mut tick = 0u64;
    while args.count == 0 || tick < args.count {
        match ticker.as_mut() {
            Some(ticker) => tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.requested() => break,
            },
            None if shutdown.is_requested() => break,
            None => {}
        }
        tick += 1;

        // Unplugging, and coming back.
        if unplugged_until.is_none() && rng.f64() < args.unplug_rate {
            port.stream = None;
            report.unplugs += 1;
            unplugged_until = Some(tokio::time::Instant::now() + args.unplug_for);
            tracing::info!(for_ = ?args.unplug_for, "unplugged");
        }
        if unplugged_until.is_some_and(|until| tokio::time::Instant::now() >= until) {
            unplugged_until = None;
        }
        if unplugged_until.is_none() && port.stream.is_none() {
            if let Err(e) = port.open(args) {
                tracing::debug!(error = %e, "port still gone");
            }
        }
        let connected = port.stream.is_some();

        let elapsed_ms = start.elapsed().as_secs_f64() * 1000.0;
        let device_ms = start_ms + (elapsed_ms * (1.0 + args.clock_drift_ppm / 1e6)) as i64;
        for sim in &mut devices {
            let samples = if rng.f64() < args.burst_rate { BURST_SAMPLES } else { 1 };
            for k in (0..samples).rev() {
                // A burst delivers stored samples: older timestamps first.
                let ts = device_ms - (k as f64 * args.interval.as_secs_f64() * 1000.0) as i64;
                let sample = sim.sample(ts, args, &mut rng);
                let (len, readings) = encode(args, sim.device.id(), &sample, &mut scratch)?;
                let mut fault = Fault::None;
                let mut bytes = scratch[..len].to_vec();
                if rng.f64() < args.corrupt_rate {
                    corrupt(&mut bytes, &mut rng);
                    fault = Fault::Corrupt;
                } else if rng.f64() < args.drop_rate {
                    bytes.remove(rng.usize(..bytes.len() - 1));
                    fault = Fault::Drop;
                }
                let mut sent = Sent { device: sim.device.number(), fault, readings };
                if !connected {
                    sent.fault = Fault::Unplugged;
                    finish(&mut report, &mut record, sent)?;
                } else if !outbox.push(&bytes) {
                    sent.fault = Fault::OutboxFull;
                    finish(&mut report, &mut record, sent)?;
                } else {
                    queued.push_back((bytes.len(), sent));
                }
            }
        }
        port.drain(args, &mut outbox, &mut queued, &mut report, &mut record).await?;
        if !connected && ticker.is_none() {
            // Nothing to pace an unplugged port by: don't spin.
            tokio::time::sleep(REOPEN_EVERY).await;
        }
    }
    port.drain(args, &mut outbox, &mut queued, &mut report, &mut record).await?;
    if let Some(stream) = port.stream.as_mut() {
        let _ = AsyncWriteExt::flush(stream).await;
    }
    report.elapsed = start.elapsed();
    if let Some(mut record) = record {
        std::io::Write::flush(&mut record).context("--record")?;
    }
    Ok(report)
}

impl SimDevice {
    /// A sample at the device's clock, with stuck sensors and spikes applied.
    fn sample(&mut self, ts: i64, args: &SerialArgs, rng: &mut fastrand::Rng) -> Sample {
        let mut sample = self.device.sample(ts);
        if let Some((left, stuck)) = self.stuck.as_mut() {
            sample = Sample { ts, ..*stuck };
            *left -= 1;
            if *left == 0 {
                self.stuck = None;
            }
        } else if rng.f64() < args.stuck_rate {
            self.stuck = Some((STUCK_SAMPLES, sample));
        }
        if args.spike_rate > 0.0 {
            for q in Quantity::ALL {
                if rng.f64() < args.spike_rate {
                    let p = q.profile();
                    let jump = (p.max - p.min) / 4.0 * if rng.bool() { 1.0 } else { -1.0 };
                    let value = (sample.get(q) + jump).clamp(p.min, p.max);
                    match q {
                        Quantity::Temperature => sample.temperature = value,
                        Quantity::Humidity => sample.humidity = value,
                        Quantity::Pressure => sample.pressure = value,
                    }
                }
            }
        }
        sample
    }
}

/// Encodes a sample in the run's format into `out`: (length, the readings it carries).
#[allow(clippy::type_complexity)]
fn encode(
    args: &SerialArgs,
    device_id: &str,
    sample: &Sample,
    out: &mut [u8],
) -> anyhow::Result<(usize, Vec<(String, Option<i64>, f64)>)> {
    let clock = !args.no_clock && args.format == SerialFormat::Frames;
    let ts = clock.then_some(sample.ts);
    let all = || Quantity::ALL.map(|q| (sensor_id(device_id, q).to_string(), ts, quantized(sample.get(q), q)));
    let mut line = heapless::String::<LINE_CAPACITY>::new();
    match args.format {
        SerialFormat::Frames => {
            let n = write_frame(device_id, sample, clock, out).context("encoding a frame")?;
            Ok((n, all().to_vec()))
        }
        SerialFormat::Lines => {
            write_line(&mut line, device_id, sample).map_err(|_| anyhow::anyhow!("formatting a line"))?;
            out[..line.len()].copy_from_slice(line.as_bytes());
            Ok((line.len(), all().to_vec()))
        }
        SerialFormat::Number => {
            write_number_line(&mut line, sample).map_err(|_| anyhow::anyhow!("formatting a line"))?;
            out[..line.len()].copy_from_slice(line.as_bytes());
            let q = Quantity::Temperature;
            // The agent names a bare number after its port (or sensor_prefix).
            Ok((line.len(), vec![(String::new(), None, quantized(sample.get(q), q))]))
        }
    }
}

/// Flips one byte other than the last (a frame's delimiter, a line's `\n`), never into a 0x00
/// or `\n`: each corrupted frame or line costs only itself.
fn corrupt(bytes: &mut [u8], rng: &mut fastrand::Rng) {
    let i = rng.usize(..bytes.len() - 1);
    loop {
        let flipped = bytes[i] ^ rng.u8(1..);
        if flipped != 0 && flipped != b'\n' {
            bytes[i] = flipped;
            return;
        }
    }
}

/// Counts a frame or line by its fate and records it.
fn finish(report: &mut Report, record: &mut Option<impl std::io::Write>, sent: Sent) -> anyhow::Result<()> {
    report.sent += 1;
    report.readings += sent.readings.len() as u64;
    match sent.fault {
        Fault::None => {
            report.intact += 1;
            report.intact_readings += sent.readings.len() as u64;
        }
        Fault::Corrupt => report.corrupted += 1,
        Fault::Drop => report.dropped_byte += 1,
        Fault::OutboxFull => report.outbox_full += 1,
        Fault::Unplugged => report.unplugged += 1,
    }
    if let Some(record) = record {
        let readings: Vec<_> = sent
            .readings
            .iter()
            .map(|(sensor, ts, value)| json!({"sensor": sensor, "ts": ts, "value": value}))
            .collect();
        let line = json!({"device": sent.device, "fault": sent.fault.label(), "readings": readings});
        writeln!(record, "{line}").context("--record")?;
    }
    Ok(())
}

impl Port {
    /// Opens the port and writes what a device writes at boot: a delimiter, so the receiver
    /// drops any partial frame or line it held.
    fn open(&mut self, args: &SerialArgs) -> anyhow::Result<()> {
        let mut stream = tokio_serial::new(args.port.to_string_lossy(), args.baud).open_native_async()?;
        // Shared, so a test may hold the same pseudo-terminal open between two runs.
        stream.set_exclusive(false)?;
        let boot: &[u8] = if args.format == SerialFormat::Frames { &[0] } else { b"\r\n" };
        // A fresh port takes a byte or two without blocking.
        stream.try_write(boot).ok();
        self.stream = Some(stream);
        tracing::debug!(port = %args.port.display(), "port open");
        Ok(())
    }

    /// Writes the outbox, paced; records each frame once its last byte is written. If the port
    /// goes away, what was not written whole is recorded as lost to the unplug.
    async fn drain(
        &mut self,
        args: &SerialArgs,
        outbox: &mut Outbox<OUTBOX_BYTES>,
        queued: &mut VecDeque<(usize, Sent)>,
        report: &mut Report,
        record: &mut Option<impl std::io::Write>,
    ) -> anyhow::Result<()> {
        // Bytes of the oldest queued frame already written.
        let mut written_of_first = 0usize;
        while !outbox.is_empty() {
            let Some(stream) = self.stream.as_mut() else { break };
            let chunk = outbox.pending().len().min(if args.unpaced { outbox.pending().len() } else { PACE_CHUNK });
            if !args.unpaced {
                // The wire's clock runs on from the last byte, so a late wake-up is made up for on
                // the next chunk; only an idle wire starts afresh.
                let now = tokio::time::Instant::now();
                if self.paced_until + PACE_SLACK < now {
                    self.paced_until = now;
                }
                self.paced_until += Duration::from_secs_f64(chunk as f64 * 10.0 / f64::from(args.baud));
            }
            match AsyncWriteExt::write_all(stream, &outbox.pending()[..chunk]).await {
                Ok(()) => {
                    outbox.consume(chunk);
                    report.bytes += chunk as u64;
                    written_of_first += chunk;
                    while let Some((len, _)) = queued.front() {
                        if written_of_first < *len {
                            break;
                        }
                        written_of_first -= *len;
                        let (_, sent) = queued.pop_front().expect("front exists");
                        finish(report, record, sent)?;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the port went away; retrying");
                    self.stream = None;
                    break;
                }
            }
            if !args.unpaced {
                tokio::time::sleep_until(self.paced_until).await;
            }
        }
        if self.stream.is_none() {
            outbox.consume(usize::MAX);
            for (_, mut sent) in queued.drain(..) {
                sent.fault = Fault::Unplugged;
                finish(report, record, sent)?;
            }
        }
        Ok(())
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_between_zero_and_one() {
        assert_eq!(parse_rate("0.25"), Ok(0.25));
        assert_eq!(parse_rate("1"), Ok(1.0));
        assert!(parse_rate("1.5").is_err());
        assert!(parse_rate("-0.1").is_err());
        assert!(parse_rate("often").is_err());
    }

    #[test]
    fn corruption_never_touches_or_makes_a_delimiter() {
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..10_000 {
            let original = [1u8, 2, 3, b'\n' ^ 1, 0xff, 0];
            let mut bytes = original;
            corrupt(&mut bytes, &mut rng);
            assert_eq!(bytes[5], 0);
            assert!(bytes[..5].iter().all(|&b| b != 0 && b != b'\n'), "{bytes:?}");
            assert_eq!(bytes.iter().zip(&original).filter(|(a, b)| a != b).count(), 1);
        }
    }
}
