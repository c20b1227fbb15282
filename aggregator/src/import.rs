//! `tributary-aggregator import`: a history from a CSV or JSON Lines file appended to the log as
//! just another stream, processed like live data.
//!
//! The file's readings go in file order under `--agent` and an epoch derived from the file's
//! contents (SHA-256), numbered from 0: importing the same file again appends nothing (the log
//! drops every block as a duplicate), and a different file is a different epoch. A line that does
//! not parse or validate is counted and reported with its number, and skipped; it never stops the
//! lines after it. Offline: the aggregator must be stopped (one writer per log).
//!
//! CSV: `sensor,ts,value`, a header line allowed; `ts` in Unix milliseconds or RFC 3339.
//! JSON Lines: `{"sensor": "room1/temp", "ts": 1764000000000 | "2025-11-24T16:00:00Z", "value": 21.5}`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use tributary_shared::BlockBuilder;
use tributary_shared::reading::{validate_sensor_id, validate_value_and_ts};

use crate::log::{self, LogBlock};

/// Readings per log block, and blocks per log transaction.
const BLOCK_READINGS: usize = 10_000;
const BLOCKS_PER_APPEND: usize = 20;
/// Rejected lines reported one by one; the rest are only counted.
const REPORTED_REJECTIONS: usize = 10;
/// Longest line read whole; a longer one (a file without line breaks, a binary file) is
/// rejected without holding it in memory.
const MAX_LINE_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    /// From the file name: `.jsonl`/`.ndjson`/`.json` is JSON Lines, anything else CSV.
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("jsonl" | "ndjson" | "json") => Format::Jsonl,
            _ => Format::Csv,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("agent id {0:?}: must be non-empty, without control characters, and not start with `_` (reserved)")]
    Agent(String),
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error("appending to the log: {0}")]
    Append(String),
    #[error("cannot start the import's runtime: {0}")]
    Runtime(std::io::Error),
}

/// What an import did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImportReport {
    pub epoch: i64,
    pub lines: u64,
    pub readings: u64,
    pub appended: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// The first rejected lines: `line 12: ...`.
    pub rejections: Vec<String>,
    pub seconds: f64,
}

/// Appends the readings of `path` to the log in `data_dir` as agent `agent`. The caller holds the
/// data directory's lock.
pub fn import(data_dir: &Path, agent: &str, path: &Path, format: Format) -> Result<ImportReport, ImportError> {
    if agent.is_empty() || agent.starts_with('_') || agent.chars().any(char::is_control) {
        return Err(ImportError::Agent(agent.to_string()));
    }
    let started = Instant::now();
    let read_error = |source| ImportError::Read { path: path.to_path_buf(), source };
    let epoch = epoch_of(path).map_err(read_error)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ImportError::Runtime)?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
    let writer = log::start(&data_dir.join("log.db"), metrics, crate::Liveness::default())?;
    let mut report = ImportReport { epoch, ..ImportReport::default() };
    let mut pending: Vec<LogBlock> = Vec::new();
    let mut block = BlockBuilder::default();
    let (mut block_first, mut next_seq) = (0u64, 0u64);
    let append = |blocks: Vec<LogBlock>, report: &mut ImportReport| -> Result<(), ImportError> {
        let ack = runtime
            .block_on(writer.handle.append(agent, epoch, blocks))
            .map_err(|e| ImportError::Append(e.to_string()))?;
        report.appended += ack.accepted;
        report.duplicates += ack.duplicates;
        Ok(())
    };
    let result = (|| -> Result<(), ImportError> {
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let n = std::io::Read::by_ref(&mut reader)
                .take(MAX_LINE_BYTES)
                .read_until(b'\n', &mut raw)
                .map_err(read_error)?;
            if n == 0 {
                break;
            }
            report.lines += 1;
            let whole = raw.ends_with(b"\n") || (n as u64) < MAX_LINE_BYTES;
            let reject = |report: &mut ImportReport, reason: String| {
                report.rejected += 1;
                if report.rejections.len() < REPORTED_REJECTIONS {
                    report.rejections.push(format!("line {}: {reason}", report.lines));
                }
            };
            if !whole {
                // Skip the rest of the over-long line without keeping it.
                loop {
                    let buf = reader.fill_buf().map_err(read_error)?;
                    if buf.is_empty() {
                        break;
                    }
                    match buf.iter().position(|b| *b == b'\n') {
                        Some(i) => {
                            reader.consume(i + 1);
                            break;
                        }
                        None => {
                            let len = buf.len();
                            reader.consume(len);
                        }
                    }
                }
                reject(&mut report, format!("longer than {MAX_LINE_BYTES} bytes"));
                continue;
            }
            let Ok(line) = std::str::from_utf8(&raw) else {
                reject(&mut report, "not UTF-8 text".into());
                continue;
            };
            let text = line.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            let parsed = match format {
                Format::Csv => parse_csv(text),
                Format::Jsonl => parse_jsonl(text),
            };
            let (sensor, ts, value) = match parsed {
                Ok(reading) => reading,
                // A CSV header: the first line, whose time is not a time.
                Err(_) if report.lines == 1 && format == Format::Csv && text.contains("ts") => continue,
                Err(reason) => {
                    reject(&mut report, reason);
                    continue;
                }
            };
            block.push(&sensor, ts, value);
            next_seq += 1;
            report.readings += 1;
            if block.len() >= BLOCK_READINGS {
                let full = std::mem::take(&mut block);
                pending.push(log_block(full, block_first));
                block_first = next_seq;
                if pending.len() >= BLOCKS_PER_APPEND {
                    append(std::mem::take(&mut pending), &mut report)?;
                }
            }
        }
        if !block.is_empty() {
            pending.push(log_block(std::mem::take(&mut block), block_first));
        }
        if !pending.is_empty() {
            append(std::mem::take(&mut pending), &mut report)?;
        }
        Ok(())
    })();
    runtime.block_on(writer.handle.stop());
    let _ = writer.thread.join();
    result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn log_block(block: BlockBuilder, first_seq: u64) -> LogBlock {
    let block = block.finish();
    LogBlock { first_seq, count: block.len() as u32, data: Bytes::from(block.encode()) }
}

/// The epoch of a file: 63 bits of the SHA-256 of its contents.
fn epoch_of(path: &Path) -> std::io::Result<i64> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path)?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let digest = hash.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    Ok((u64::from_be_bytes(first) >> 1) as i64)
}

/// A time: Unix milliseconds, or RFC 3339.
fn parse_ts(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| format!("time {text:?} is neither Unix milliseconds nor RFC 3339"))
}

fn checked(sensor: &str, ts: i64, value: f64) -> Result<(), String> {
    validate_sensor_id(sensor).map_err(|e| e.to_string())?;
    validate_value_and_ts(ts, value).map_err(|e| e.to_string())
}

/// `sensor,ts,value`; the sensor id may be quoted (`"a,b",...`).
fn parse_csv(line: &str) -> Result<(String, i64, f64), String> {
    let (sensor, rest) = match line.strip_prefix('"') {
        Some(quoted) => {
            let end = quoted.find("\",").ok_or("an unterminated quoted sensor id")?;
            (quoted[..end].replace("\"\"", "\""), &quoted[end + 2..])
        }
        None => {
            let (sensor, rest) = line.split_once(',').ok_or("expected sensor,ts,value")?;
            (sensor.trim().to_string(), rest)
        }
    };
    let (ts, value) = rest.split_once(',').ok_or("expected sensor,ts,value")?;
    let ts = parse_ts(ts)?;
    let value: f64 = value.trim().parse().map_err(|_| format!("value {:?} is not a number", value.trim()))?;
    checked(&sensor, ts, value)?;
    Ok((sensor, ts, value))
}

fn parse_jsonl(line: &str) -> Result<(String, i64, f64), String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        sensor: String,
        ts: serde_json::Value,
        value: f64,
    }
    let line: Line = serde_json::from_str(line).map_err(|e| format!("not a reading object: {e}"))?;
    let ts = match &line.ts {
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| format!("time {n} is not whole milliseconds"))?,
        serde_json::Value::String(s) => parse_ts(s)?,
        other => return Err(format!("time {other} is neither Unix milliseconds nor RFC 3339")),
    };
    checked(&line.sensor, ts, line.value)?;
    Ok((line.sensor, ts, line.value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_jsonl_lines_parse_or_say_why_not() {
        assert_eq!(parse_csv("room1/temp,1764000000000,21.5"), Ok(("room1/temp".into(), 1_764_000_000_000, 21.5)));
        assert_eq!(parse_csv("\"a,b\",2025-11-24T16:00:00Z,-1e3"), Ok(("a,b".into(), 1_764_000_000_000, -1000.0)));
        assert!(parse_csv("room1/temp,yesterday,1").unwrap_err().contains("RFC 3339"));
        assert!(parse_csv("room1/temp,1764000000000,NaN").is_err());
        assert!(parse_csv("room#1,1764000000000,1").is_err());
        assert!(parse_csv("room1/temp,1764000000000").unwrap_err().contains("sensor,ts,value"));
        assert_eq!(
            parse_jsonl(r#"{"sensor":"s","ts":"2025-11-24T16:00:00Z","value":1.5}"#),
            Ok(("s".into(), 1_764_000_000_000, 1.5))
        );
        assert!(parse_jsonl(r#"{"sensor":"s","ts":1.5,"value":1}"#).is_err());
        assert!(parse_jsonl(r#"{"sensor":"s","ts":1764000000000,"value":1,"unit":"C"}"#).is_err());
    }
}
