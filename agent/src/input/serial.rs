//! Serial ports (`[[serial]]`): sensors wired to the gateway's UARTs or USB-serial adapters.
//!
//! Each port is read by its own task into its own [`Intake`], so its readings take the same path
//! as MQTT readings: validated by the same rules, batched into the spool's group commit.
//!
//! Two formats:
//! - `frames`: binary frames, postcard + CRC-32 + COBS ([`tributary_shared::frame`] documents the
//!   bytes). Corruption is detected; the reader resynchronises at the next `0x00`.
//! - `lines`: text, `sensor=value[,sensor=value...]` or a bare number per line, ended by `\n` or
//!   `\r\n`, as cheap firmware prints them. A corrupted digit cannot be detected; prefer frames.
//!   After every (re)open the first line is dropped and counted (`partial_line`): the port may have
//!   been opened mid-line, and the tail of `21.5`, `1.5`, would pass as a reading.
//!
//! Line noise, a wrong baud rate, truncated or overlong frames and lines are everyday events on a
//! UART: each bad frame, line or reading is counted by reason in
//! `tributary_agent_serial_rejected_total{port, reason}` and skipped; good data around it goes on.
//! A device that goes away (a read of 0 bytes, or an error: unplugged, hung up) is reopened with
//! backoff, 1 s doubling to 30 s; the path is resolved again at every open, so a
//! `/dev/serial/by-id/` link follows the device to whatever `ttyUSB*` it comes back as.
//!
//! [`SerialPorts`] runs the configured ports, each with its own stop signal: a reload (SIGHUP)
//! stops the ports taken out of the file, starts the new ones, restarts those whose settings
//! changed and leaves the others reading.

use std::path::PathBuf;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_serial::SerialPortBuilderExt;
use tributary_shared::frame::{Deframer, FrameError, MAX_ENCODED_LEN};
use tributary_shared::reading::{ReadingError, validate_sensor_id, validate_value};

use super::Intake;
use crate::AgentError;
use crate::config::{SerialConfig, SerialFormat};
use crate::decode::{DeviceTsPolicy, Stamp};
use crate::metrics::{Metrics, PortLabels, SerialRejectLabels};
use crate::spool::SpoolError;

/// Longest text line, `\r\n` excluded; longer ones are counted as `too_long` and skipped.
pub const MAX_LINE_LEN: usize = 1024;

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What read buffer a port gets: a few ms of data at 921,600 baud, many frames at once when a
/// device bursts.
const READ_BUFFER: usize = 4096;

/// Why bytes or readings from a port were not taken. The label is the `reason` of
/// `tributary_agent_serial_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Frames: not valid COBS between two delimiters (bytes lost, added or changed).
    Cobs,
    /// Frames: checksum mismatch, or too short to hold one.
    Crc,
    /// Frames: a format version this agent does not read.
    Version,
    /// Frames: the checksum matches but the content does not decode (a firmware bug).
    Decode,
    /// A frame or line longer than the limit ([`tributary_shared::frame::MAX_FRAME_LEN`], [`MAX_LINE_LEN`]).
    TooLong,
    /// Lines: not `sensor=value[,...]` or a number, or not UTF-8.
    BadLine,
    /// Lines: the first line after opening the port, which may have been cut.
    PartialLine,
    /// A reading whose value is NaN or infinite.
    NotFinite,
    /// A reading whose timestamp is before 2000, after 9999 or too far ahead of the clock.
    BadTimestamp,
    /// A reading whose sensor id is empty, too long or holds `+`, `#` or control characters.
    BadSensorId,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::Cobs,
        Reason::Crc,
        Reason::Version,
        Reason::Decode,
        Reason::TooLong,
        Reason::BadLine,
        Reason::PartialLine,
        Reason::NotFinite,
        Reason::BadTimestamp,
        Reason::BadSensorId,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Cobs => "cobs",
            Reason::Crc => "crc",
            Reason::Version => "version",
            Reason::Decode => "decode",
            Reason::TooLong => "too_long",
            Reason::BadLine => "bad_line",
            Reason::PartialLine => "partial_line",
            Reason::NotFinite => "not_finite",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::BadSensorId => "bad_sensor_id",
        }
    }

    fn from_frame_error(e: FrameError) -> Reason {
        match e {
            FrameError::Cobs => Reason::Cobs,
            FrameError::Crc => Reason::Crc,
            FrameError::Version(_) => Reason::Version,
            FrameError::Decode => Reason::Decode,
            FrameError::TooLong | FrameError::BufferTooSmall => Reason::TooLong,
        }
    }

    fn from_reading_error(e: &ReadingError) -> Reason {
        match e {
            ReadingError::NotFinite(_) => Reason::NotFinite,
            ReadingError::TooOld(_) | ReadingError::TooLate(_) | ReadingError::InFuture { .. } => Reason::BadTimestamp,
            _ => Reason::BadSensorId,
        }
    }
}

/// One port's metrics, looked up once: the hot path only increments.
struct PortMetrics {
    bytes: Counter,
    readings: Counter,
    open: Gauge,
    opens: Counter,
    rejected: [Counter; Reason::ALL.len()],
}

impl PortMetrics {
    fn new(metrics: &Metrics, port: &str) -> PortMetrics {
        let labels = PortLabels { port: port.to_string() };
        // Every reason exists from the start, so a dashboard sees 0 rather than nothing.
        let rejected = Reason::ALL.map(|reason| {
            metrics
                .serial_rejected
                .get_or_create(&SerialRejectLabels { port: port.to_string(), reason: reason.label() })
                .clone()
        });
        PortMetrics {
            bytes: metrics.serial_bytes.get_or_create(&labels).clone(),
            readings: metrics.serial_readings.get_or_create(&labels).clone(),
            open: metrics.serial_open.get_or_create(&labels).clone(),
            opens: metrics.serial_opens.get_or_create(&labels).clone(),
            rejected,
        }
    }

    fn reject(&self, reason: Reason) {
        self.rejected[reason as usize].inc();
    }
}

/// Turns a port's bytes into validated readings: ids prefixed, timestamps checked or stamped.
pub struct PortDecoder {
    port: String,
    format: Format,
    prefix: Option<String>,
    /// How device timestamps are judged (`validation.max_clock_skew`, `[clock]`).
    device: DeviceTsPolicy,
    /// Reused for `<prefix>/<id>`.
    id: String,
}

enum Format {
    Frames(Box<Deframer<MAX_ENCODED_LEN>>),
    Lines(LineSplitter),
}

impl PortDecoder {
    pub fn new(config: &SerialConfig, max_skew_ms: i64) -> PortDecoder {
        let format = match config.format {
            SerialFormat::Frames => Format::Frames(Box::default()),
            SerialFormat::Lines => Format::Lines(LineSplitter::default()),
        };
        PortDecoder {
            port: config.name(),
            format,
            prefix: config.sensor_prefix.clone(),
            device: DeviceTsPolicy::new(max_skew_ms),
            id: String::new(),
        }
    }

    /// The port was (re)opened: whatever came before is unrelated to what follows.
    pub fn reset(&mut self) {
        match &mut self.format {
            Format::Frames(deframer) => deframer.reset(),
            Format::Lines(lines) => lines.reset(),
        }
    }

    /// Decodes bytes read at `now` (Unix ms): `emit` gets each valid reading, `reject` each
    /// rejection. Returns the number of readings emitted.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        now: i64,
        mut emit: impl FnMut(&str, i64, f64),
        reject: impl FnMut(Reason),
    ) -> usize {
        self.feed_stamped(bytes, now, true, |sensor, ts, value, _| emit(sensor, ts, value), reject)
    }

    /// As [`PortDecoder::feed`], with the gateway clock's trust (`trusted`: synchronised) and
    /// each reading's [`Stamp`].
    pub fn feed_stamped(
        &mut self,
        bytes: &[u8],
        now: i64,
        trusted: bool,
        mut emit: impl FnMut(&str, i64, f64, Stamp),
        mut reject: impl FnMut(Reason),
    ) -> usize {
        let PortDecoder { port, format, prefix, device, id } = self;
        let mut out = Emitter { port, prefix: prefix.as_deref(), device: *device, trusted, now, id, emitted: 0 };
        match format {
            Format::Frames(deframer) => deframer.feed(bytes, |frame| match frame {
                Ok(frame) => {
                    for r in frame.readings() {
                        out.reading(r.sensor, r.ts, r.value, &mut emit, &mut reject);
                    }
                }
                Err(e) => reject(Reason::from_frame_error(e)),
            }),
            Format::Lines(lines) => lines.feed(bytes, |line| match line {
                Line::Text(text) => out.line(text, &mut emit, &mut reject),
                Line::Rejected(reason) => reject(reason),
            }),
        }
        out.emitted
    }
}

/// Validates readings and hands them on; shared by both formats.
struct Emitter<'a> {
    port: &'a str,
    prefix: Option<&'a str>,
    device: DeviceTsPolicy,
    trusted: bool,
    now: i64,
    id: &'a mut String,
    emitted: usize,
}

impl Emitter<'_> {
    /// A reading with the device's id: prefixed, then validated.
    fn reading(
        &mut self,
        sensor: &str,
        ts: Option<i64>,
        value: f64,
        emit: &mut impl FnMut(&str, i64, f64, Stamp),
        reject: &mut impl FnMut(Reason),
    ) {
        let Some(prefix) = self.prefix else { return self.checked(sensor, ts, value, emit, reject) };
        let mut id = std::mem::take(self.id);
        id.clear();
        id.push_str(prefix);
        id.push('/');
        id.push_str(sensor);
        self.checked(&id, ts, value, emit, reject);
        *self.id = id;
    }

    /// A reading with its final id: validated by the rules MQTT readings follow.
    fn checked(
        &mut self,
        sensor: &str,
        ts: Option<i64>,
        value: f64,
        emit: &mut impl FnMut(&str, i64, f64, Stamp),
        reject: &mut impl FnMut(Reason),
    ) {
        let valid = validate_sensor_id(sensor)
            .and_then(|()| validate_value(value))
            .and_then(|()| self.device.judge(ts, self.now, self.trusted));
        match valid {
            Ok((ts, stamp)) => {
                emit(sensor, ts, value, stamp);
                self.emitted += 1;
            }
            Err(e) => reject(Reason::from_reading_error(&e)),
        }
    }

    /// `sensor=value[,sensor=value...]` or a bare number. A line that does not parse as a whole is
    /// rejected whole (it is probably noise); parsed readings are then validated one by one.
    fn line(&mut self, line: &[u8], emit: &mut impl FnMut(&str, i64, f64, Stamp), reject: &mut impl FnMut(Reason)) {
        let Ok(text) = std::str::from_utf8(line) else { return reject(Reason::BadLine) };
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        if !text.contains('=') {
            let Ok(value) = text.parse::<f64>() else { return reject(Reason::BadLine) };
            // A bare number is the prefix itself, or the port's name.
            let id = self.prefix.unwrap_or(self.port);
            return self.checked(id, None, value, emit, reject);
        }
        let pairs = || text.split(',').map(str::trim).filter(|pair| !pair.is_empty());
        fn parse(pair: &str) -> Option<(&str, f64)> {
            let (name, value) = pair.split_once('=')?;
            let name = name.trim();
            (!name.is_empty()).then_some(())?;
            Some((name, value.trim().parse::<f64>().ok()?))
        }
        if pairs().any(|pair| parse(pair).is_none()) {
            return reject(Reason::BadLine);
        }
        for (name, value) in pairs().filter_map(parse) {
            self.reading(name, None, value, emit, reject);
        }
    }
}

enum Line<'a> {
    Text(&'a [u8]),
    Rejected(Reason),
}

/// Splits text into lines at `\n` (a `\r` before it is dropped with the other whitespace), with a
/// length cap, dropping the first line after every reset.
#[derive(Debug)]
struct LineSplitter {
    buf: Vec<u8>,
    overflow: bool,
    /// No line end seen since the port was opened: the current line may have been cut.
    first: bool,
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter { buf: Vec::with_capacity(256), overflow: false, first: true }
    }
}

impl LineSplitter {
    fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
        self.first = true;
    }

    fn feed(&mut self, mut input: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        while !input.is_empty() {
            let (chunk, ended) = match input.iter().position(|&b| b == b'\n') {
                Some(i) => (&input[..i], Some(i + 1)),
                None => (input, None),
            };
            if !self.overflow {
                if self.buf.len() + chunk.len() > MAX_LINE_LEN + 1 {
                    self.overflow = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            let Some(next) = ended else { break };
            input = &input[next..];
            let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
            if self.first {
                if !line.is_empty() || self.overflow {
                    on_line(Line::Rejected(Reason::PartialLine));
                }
            } else if self.overflow || line.len() > MAX_LINE_LEN {
                on_line(Line::Rejected(Reason::TooLong));
            } else {
                on_line(Line::Text(line));
            }
            self.first = false;
            self.overflow = false;
            self.buf.clear();
        }
    }
}

/// How a read session ended.
enum Ended {
    Shutdown,
    /// The device went away; the string says how. `bool`: it had sent bytes (reset the backoff).
    Gone(String, bool),
}

/// One `[[serial]]` port: opens it, reads until it goes away, reopens with backoff.
pub struct SerialInput {
    path: PathBuf,
    baud: u32,
    name: String,
    decoder: PortDecoder,
    metrics: PortMetrics,
}

impl SerialInput {
    pub fn new(config: &SerialConfig, max_skew_ms: i64, metrics: &Metrics) -> SerialInput {
        let name = config.name();
        SerialInput {
            path: config.path.clone(),
            baud: config.baud,
            metrics: PortMetrics::new(metrics, &name),
            decoder: PortDecoder::new(config, max_skew_ms),
            name,
        }
    }

    /// Reads the port until shutdown, then hands what it took to the spool. Fails only if the
    /// spool has stopped; a missing or failing device is retried for as long as the agent runs.
    pub async fn run(mut self, mut intake: Intake, mut shutdown: watch::Receiver<bool>) -> Result<(), SpoolError> {
        let mut backoff = FIRST_BACKOFF;
        // Log a missing device once, not at every retry.
        let mut missing_logged = false;
        while !*shutdown.borrow() {
            match self.open() {
                Ok((port, device)) => {
                    tracing::info!(port = %self.name, path = %self.path.display(), device = %device.display(), baud = self.baud, "serial port open");
                    missing_logged = false;
                    self.metrics.opens.inc();
                    self.metrics.open.set(1);
                    self.decoder.reset();
                    let ended = self.read(port, &mut intake, &mut shutdown).await;
                    self.metrics.open.set(0);
                    match ended? {
                        Ended::Shutdown => break,
                        Ended::Gone(why, sent) => {
                            if sent {
                                backoff = FIRST_BACKOFF;
                            }
                            tracing::warn!(port = %self.name, reason = %why, retry_in = ?backoff, "serial device went away; reopening");
                        }
                    }
                }
                Err(e) if !missing_logged => {
                    tracing::warn!(port = %self.name, path = %self.path.display(), error = %e, retry_in = ?backoff, "cannot open the serial port; retrying until it appears");
                    missing_logged = true;
                }
                Err(e) => {
                    tracing::debug!(port = %self.name, error = %e, retry_in = ?backoff, "serial port still unavailable")
                }
            }
            // Readings taken before the device went away must not wait for it to come back.
            intake.flush().await?;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        // With what the pre-filters still hold.
        intake.finish().await
    }

    /// Resolves the path (a by-id link may point elsewhere since the last open) and opens it.
    fn open(&self) -> Result<(tokio_serial::SerialStream, PathBuf), String> {
        let device = std::fs::canonicalize(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let port = tokio_serial::new(device.to_string_lossy(), self.baud)
            .open_native_async()
            .map_err(|e| format!("{}: {e}", device.display()))?;
        Ok((port, device))
    }

    async fn read(
        &mut self,
        mut port: tokio_serial::SerialStream,
        intake: &mut Intake,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ended, SpoolError> {
        let spool = intake.sender();
        let mut buf = vec![0u8; READ_BUFFER];
        let mut sent = false;
        let mut ticker = intake.ticker();
        loop {
            tokio::select! {
                // What the pre-filters held long enough goes out even when the device is quiet.
                _ = ticker.tick() => intake.tick(&mut ticker)?,
                // The writer has room again: hand over what piled up meanwhile.
                permit = spool.reserve(), if intake.has_pending() => match permit {
                    Ok(permit) => intake.send_with(permit),
                    Err(_) => return Err(SpoolError::Closed),
                },
                n = port.read(&mut buf), if !intake.is_full() => match n {
                    Ok(0) => return Ok(Ended::Gone("end of file (hung up)".into(), sent)),
                    Ok(n) => {
                        sent = true;
                        self.take(&buf[..n], intake);
                        intake.try_flush()?;
                    }
                    Err(e) => return Ok(Ended::Gone(e.to_string(), sent)),
                },
                _ = shutdown.changed() => return Ok(Ended::Shutdown),
            }
        }
    }

    fn take(&mut self, bytes: &[u8], intake: &mut Intake) {
        let SerialInput { decoder, metrics, name, .. } = self;
        metrics.bytes.inc_by(bytes.len() as u64);
        let now = intake.clock_now();
        let n = decoder.feed_stamped(
            bytes,
            now.wall_ms,
            now.trusted,
            |sensor, ts, value, stamp| intake.take_stamped(sensor, ts, value, stamp, &now),
            |reason| {
                tracing::debug!(port = %name, reason = reason.label(), "serial input rejected");
                metrics.reject(reason);
            },
        );
        metrics.readings.inc_by(n as u64);
    }
}

/// The `[[serial]]` ports being read, each by its own [`SerialInput`] task with its own stop signal.
pub struct SerialPorts {
    /// Fed nothing: each port's intake is made from it ([`Intake::another`]).
    intake: Intake,
    max_skew_ms: i64,
    running: Vec<RunningPort>,
    /// The first failure of a port that has ended (the spool stopped), for [`SerialPorts::join`].
    failed: Option<AgentError>,
}

struct RunningPort {
    config: SerialConfig,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), SpoolError>>,
}

impl SerialPorts {
    /// Starts reading `ports`, each into an intake like `intake`.
    pub fn start(ports: &[SerialConfig], intake: Intake, max_skew_ms: i64) -> SerialPorts {
        let mut serial = SerialPorts { intake, max_skew_ms, running: Vec::new(), failed: None };
        for port in ports {
            serial.spawn(port.clone());
        }
        serial
    }

    fn spawn(&mut self, config: SerialConfig) {
        let (stop, stopped) = watch::channel(false);
        let mut input = SerialInput::new(&config, self.max_skew_ms, self.intake.metrics());
        input.decoder.device = self.intake.device_policy();
        let task = tokio::spawn(input.run(self.intake.another(), stopped));
        self.running.push(RunningPort { config, stop, task });
    }

    /// Reads the ports of `ports` from now on: the ports missing from it stop (after handing over
    /// what they read), its new ones start, ports whose settings changed restart, the others go on
    /// untouched. Returns what changed.
    pub async fn reconfigure(&mut self, ports: &[SerialConfig]) -> PortChanges {
        let running: Vec<SerialConfig> = self.running.iter().map(|p| p.config.clone()).collect();
        let changes = PortChanges::between(&running, ports);
        let (ending, staying): (Vec<RunningPort>, Vec<RunningPort>) =
            std::mem::take(&mut self.running).into_iter().partition(|p| {
                let name = p.config.name();
                changes.removed.contains(&name) || changes.changed.contains(&name)
            });
        self.running = staying;
        // All told at once, and waited for before anything starts: a restarted port's device
        // must not have two readers splitting its bytes.
        for port in &ending {
            let _ = port.stop.send(true);
        }
        for port in ending {
            self.ended(&port.config.name(), port.task.await);
        }
        for port in ports {
            let name = port.name();
            if changes.added.contains(&name) || changes.changed.contains(&name) {
                self.spawn(port.clone());
            }
        }
        changes
    }

    /// Tells every port to stop (the agent stops); [`SerialPorts::join`] waits for them.
    pub fn stop(&self) {
        for port in &self.running {
            let _ = port.stop.send(true);
        }
    }

    /// Waits for every port to hand over what it read and end. The first failure of any port,
    /// including ports a reload stopped.
    pub async fn join(mut self) -> Result<(), AgentError> {
        for port in std::mem::take(&mut self.running) {
            self.ended(&port.config.name(), port.task.await);
        }
        self.failed.map_or(Ok(()), Err)
    }

    fn ended(&mut self, name: &str, result: Result<Result<(), SpoolError>, tokio::task::JoinError>) {
        let error = match result {
            Ok(Ok(())) => return,
            Ok(Err(e)) => AgentError::Spool(e),
            Err(e) => AgentError::Task(e.to_string()),
        };
        tracing::error!(port = %name, error = %error, "serial input failed");
        self.failed.get_or_insert(error);
    }
}

/// What a new `[[serial]]` list changes, by port name (unique, checked at load; the `port` label
/// of the port's metrics).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PortChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// In both lists with different settings: restarted.
    pub changed: Vec<String>,
}

impl PortChanges {
    pub fn between(running: &[SerialConfig], new: &[SerialConfig]) -> PortChanges {
        // Settings compared by their Debug text: every field, those added later included.
        let settings = |port: &SerialConfig| format!("{port:?}");
        let mut changes = PortChanges::default();
        for port in new {
            let name = port.name();
            match running.iter().find(|p| p.name() == name) {
                None => changes.added.push(name),
                Some(old) if settings(old) != settings(port) => changes.changed.push(name),
                Some(_) => {}
            }
        }
        for port in running {
            let name = port.name();
            if !new.iter().any(|p| p.name() == name) {
                changes.removed.push(name);
            }
        }
        changes
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tributary_shared::frame::{FrameReading, encode};

    const NOW: i64 = 1_764_000_000_000;

    fn port(format: &str, prefix: Option<&str>) -> SerialConfig {
        let prefix = prefix.map(|p| format!("sensor_prefix = {p:?}\n")).unwrap_or_default();
        let text = format!(
            "agent_id = \"gw\"\ndata_dir = \"/tmp/x\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n\
             [[serial]]\npath = \"/dev/serial/by-id/usb-Acme_Sensor-if00\"\nformat = {format:?}\n{prefix}"
        );
        let config = crate::config::Config::parse(&text, Path::new("agent.toml")).unwrap();
        config.serial[0].clone()
    }

    /// Feeds `chunks` (one read each): readings as (id, ts, value) and rejection labels.
    fn decode(config: &SerialConfig, chunks: &[&[u8]]) -> (Vec<(String, i64, f64)>, Vec<&'static str>) {
        let mut decoder = PortDecoder::new(config, 300_000);
        let (mut out, mut rejected) = (Vec::new(), Vec::new());
        for chunk in chunks {
            let n =
                decoder.feed(chunk, NOW, |id, ts, v| out.push((id.to_string(), ts, v)), |r| rejected.push(r.label()));
            assert!(n <= out.len());
        }
        (out, rejected)
    }

    fn ports(toml: &str) -> Vec<SerialConfig> {
        let text = format!(
            "agent_id = \"gw\"\ndata_dir = \"/tmp/x\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n{toml}"
        );
        crate::config::Config::parse(&text, Path::new("agent.toml")).unwrap().serial
    }

    #[test]
    fn a_new_port_list_starts_stops_and_restarts_only_the_ports_that_differ() {
        let port = |path: &str, extra: &str| format!("[[serial]]\npath = \"{path}\"\nformat = \"lines\"\n{extra}");
        let running = ports(
            &[
                port("/dev/ttyUSB0", ""),
                port("/dev/ttyUSB1", "baud = 9600\n"),
                port("/dev/ttyUSB2", "sensor_prefix = \"a\"\n"),
                port("/dev/ttyACM0", ""),
            ]
            .concat(),
        );
        let new = ports(
            &[
                // Unchanged, though written differently (the default baud spelt out) and listed later.
                port("/dev/ttyACM0", ""),
                port("/dev/ttyUSB0", "baud = 115200\n"),
                port("/dev/ttyUSB1", "baud = 19200\n"),
                port("/dev/ttyUSB2", "sensor_prefix = \"b\"\n"),
                port("/dev/serial/by-id/usb-Acme-if00", ""),
            ]
            .concat(),
        );
        let changes = PortChanges::between(&running, &new);
        assert_eq!(
            changes,
            PortChanges {
                added: vec!["usb-Acme-if00".into()],
                removed: vec![],
                changed: vec!["ttyUSB1".into(), "ttyUSB2".into()],
            }
        );
        let fewer = ports(&port("/dev/ttyUSB0", ""));
        let changes = PortChanges::between(&running, &fewer);
        assert_eq!(changes.removed, ["ttyUSB1", "ttyUSB2", "ttyACM0"]);
        assert!(changes.added.is_empty() && changes.changed.is_empty());
        assert!(PortChanges::between(&running, &running).is_empty());
        assert!(PortChanges::between(&[], &[]).is_empty());
    }

    fn r(id: &str, value: f64) -> (String, i64, f64) {
        (id.to_string(), NOW, value)
    }

    #[test]
    fn lines_are_pairs_or_bare_numbers_and_the_first_line_after_open_is_dropped() {
        let config = port("lines", None);
        let (out, rej) = decode(&config, &[b"1.5\r\n", b"temp=21.5,hum=40\r\n22", b".25\n", b" a = 1 , b=2, \n\n\r\n"]);
        assert_eq!(out, [r("temp", 21.5), r("hum", 40.0), r("usb-Acme_Sensor-if00", 22.25), r("a", 1.0), r("b", 2.0)]);
        assert_eq!(rej, ["partial_line"]);
    }

    #[test]
    fn the_sensor_prefix_names_bare_numbers_and_prefixes_pairs() {
        let config = port("lines", Some("bench"));
        let (out, rej) = decode(&config, &[b"\n7\ntemp=1,x/y=2\n"]);
        assert_eq!(out, [r("bench", 7.0), r("bench/temp", 1.0), r("bench/x/y", 2.0)]);
        assert!(rej.is_empty());
    }

    #[test]
    fn bad_lines_are_rejected_whole_and_bad_readings_one_by_one() {
        let config = port("lines", None);
        let mut input = b"\n".to_vec();
        for line in [
            &b"hello"[..],
            b"temp=",
            b"=5",
            b"temp=21.5,hum",
            b"temp=abc",
            b"\xff\xfe=1",
            b"temp=NaN,hum=40",
            b"a+b=1,c=2",
            b"inf",
            b"ok=3",
        ] {
            input.extend(line);
            input.extend(b"\r\n");
        }
        let (out, rej) = decode(&config, &[&input]);
        assert_eq!(out, [r("hum", 40.0), r("c", 2.0), r("ok", 3.0)]);
        assert_eq!(
            rej,
            [
                "bad_line",
                "bad_line",
                "bad_line",
                "bad_line",
                "bad_line",
                "bad_line",
                "not_finite",
                "bad_sensor_id",
                "not_finite"
            ]
        );
    }

    #[test]
    fn overlong_lines_are_cut_and_the_next_line_arrives() {
        let config = port("lines", None);
        let long = vec![b'7'; MAX_LINE_LEN + 1];
        let exact = format!("v={:0>width$}", 1, width = MAX_LINE_LEN - 2);
        // In small reads and in one.
        let mut input = b"\n".to_vec();
        input.extend(&long);
        input.extend(b"\r\nx=1\n");
        input.extend(exact.as_bytes());
        input.extend(b"\r\n");
        for piece in [7, input.len()] {
            let chunks: Vec<&[u8]> = input.chunks(piece).collect();
            let (out, rej) = decode(&config, &chunks);
            assert_eq!(out, [r("x", 1.0), r("v", 1.0)], "read size {piece}");
            assert_eq!(rej, ["too_long"], "read size {piece}");
        }
    }

    #[test]
    fn frames_are_validated_reading_by_reading_and_stamped_when_they_have_no_clock() {
        let config = port("frames", Some("gw"));
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let mut stream = Vec::new();
        let readings = [
            FrameReading { sensor: "t", ts: Some(NOW - 1000), value: 1.0 },
            FrameReading { sensor: "h", ts: None, value: 2.0 },
            FrameReading { sensor: "bad#id", ts: None, value: 3.0 },
            FrameReading { sensor: "n", ts: None, value: f64::NAN },
            FrameReading { sensor: "future", ts: Some(NOW + 3_600_000), value: 4.0 },
            FrameReading { sensor: "old", ts: Some(12), value: 5.0 },
        ];
        let n = encode(&readings, &mut buf).unwrap();
        stream.extend(&buf[..n]);
        stream.extend(b"\x03noise\x00");
        let (out, rej) = decode(&config, &[&stream[..10], &stream[10..]]);
        assert_eq!(out, [("gw/t".to_string(), NOW - 1000, 1.0), r("gw/h", 2.0)]);
        assert_eq!(rej, ["bad_sensor_id", "not_finite", "bad_timestamp", "bad_timestamp", "cobs"]);
    }

    #[test]
    fn a_reset_forgets_the_partial_frame_or_line() {
        let mut decoder = PortDecoder::new(&port("lines", None), 0);
        let mut out = Vec::new();
        decoder.feed(b"\nx=1", NOW, |id, _, v| out.push((id.to_string(), v)), |_| {});
        decoder.reset();
        let mut rej = Vec::new();
        decoder.feed(b"2\ny=3\n", NOW, |id, _, v| out.push((id.to_string(), v)), |r| rej.push(r.label()));
        assert_eq!(out, [("y".to_string(), 3.0)]);
        assert_eq!(rej, ["partial_line"]);
    }

    #[test]
    fn the_commented_example_in_deploy_agent_toml_parses_to_the_documented_defaults() {
        let example = crate::config::EXAMPLE;
        let at = example.find("# [[serial]]").expect("deploy/agent.toml documents [[serial]]");
        let mut text = example[..at].to_string();
        for line in example[at..].lines() {
            let uncommented = line.strip_prefix("# ").unwrap_or(line);
            let is_key = uncommented
                .split_once(" = ")
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            text.push_str(if is_key || uncommented == "[[serial]]" { uncommented } else { line });
            text.push('\n');
        }
        let config = crate::config::Config::parse(&text, Path::new("agent.toml")).unwrap();
        let port = &config.serial[0];
        assert_eq!(port.baud, 115_200);
        assert_eq!(port.format, SerialFormat::Frames);
        assert_eq!(port.name(), "usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0");
        assert_eq!(port.sensor_prefix.as_deref(), Some("bench-1"));
    }

    #[test]
    fn serial_config_is_checked_at_start() {
        let base =
            "agent_id = \"gw\"\ndata_dir = \"/tmp/x\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n";
        let parse = |serial: &str| {
            crate::config::Config::parse(&format!("{base}{serial}"), Path::new("agent.toml")).map_err(|e| e.to_string())
        };
        let ok = parse("[[serial]]\npath = \"/dev/ttyUSB0\"\nformat = \"frames\"\n[[serial]]\npath = \"/dev/ttyAMA0\"\nformat = \"lines\"\nbaud = 9600\n").unwrap();
        assert_eq!(ok.serial.len(), 2);
        assert_eq!((ok.serial[0].baud, ok.serial[0].name().as_str()), (115_200, "ttyUSB0"));
        assert_eq!(ok.serial[1].baud, 9600);
        assert!(parse("").unwrap().serial.is_empty());

        let e = parse("[[serial]]\npath = \"/dev/ttyUSB0\"\n").unwrap_err();
        assert!(e.contains("missing field `format`"), "{e}");
        let e = parse("[[serial]]\npath = \"/dev/ttyUSB0\"\nformat = \"csv\"\n").unwrap_err();
        assert!(e.contains("serial") && e.contains("unknown variant `csv`"), "{e}");
        let e = parse("[[serial]]\npath = \"/dev/ttyUSB0\"\nformat = \"lines\"\nbaud = 0\n").unwrap_err();
        assert!(e.contains("serial.baud") && e.contains("0 is not a baud rate"), "{e}");
        let e = parse("[[serial]]\npath = \"/dev/ttyUSB0\"\nformat = \"lines\"\nspeed = 9600\n").unwrap_err();
        assert!(e.contains("unknown field `speed`"), "{e}");
        let e = parse(
            "[[serial]]\npath = \"/a/tty\"\nformat = \"lines\"\n[[serial]]\npath = \"/b/tty\"\nformat = \"lines\"\n",
        )
        .unwrap_err();
        assert!(e.contains("serial.path") && e.contains("must differ"), "{e}");
        let e =
            parse("[[serial]]\npath = \"/dev/ttyUSB0\"\nformat = \"lines\"\nsensor_prefix = \"a/#\"\n").unwrap_err();
        assert!(e.contains("serial.sensor_prefix"), "{e}");
    }
}
