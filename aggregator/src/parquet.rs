//! `format=parquet` (or `Accept: application/vnd.apache.parquet`): window lists and series as
//! Parquet files, for notebooks (pandas, polars, DuckDB read them as they are).
//!
//! Written with the parquet crate's low-level column writer (no arrow): a row group of at most
//! [`ROW_GROUP_ROWS`] rows is buffered column by column, encoded (Snappy) into a [`Sink`], and
//! the sink hands what it holds to the response body in chunks of about [`CHUNK_BYTES`] over a
//! bounded channel. The producer runs on a blocking thread (the SQLite reads are blocking) and
//! waits when the client reads slower than it writes, so what an export holds is a row group and
//! a few chunks, whatever the range. A client that hangs up closes the channel: the next send
//! fails, the export stops ([`ExportError::Gone`]) and nothing is logged above debug.
//!
//! Times (`start`, `end`, `first_ts`, `last_ts`, `updated_at`, a series' `time`) are
//! `TIMESTAMP(MILLIS, isAdjustedToUTC=true)`: the same Unix milliseconds the JSON has, which a
//! reader shows as UTC date-times. A number that is not finite (JSON's `null`) is a null.

use std::io::Write;
use std::sync::Arc;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use tokio::sync::mpsc;

use crate::api::WindowView;
use crate::json::{FIELDS, Fields};

/// The media type (IANA-registered in 2024).
pub const CONTENT_TYPE: &str = "application/vnd.apache.parquet";
/// Rows per row group: about 1 MiB of a window list's values before encoding.
pub const ROW_GROUP_ROWS: usize = 8_192;
/// The body leaves in chunks of about this size.
const CHUNK_BYTES: usize = 256 << 10;
/// Chunks written but not yet taken by the connection: the producer waits past this.
const CHANNEL_CHUNKS: usize = 2;
/// How long the producer waits for the connection to take a chunk before it gives up: a waiting
/// export holds a blocking thread and a read transaction on the store (which keeps the store's
/// WAL from being checkpointed), so a client that stops reading must not hold them for ever.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);

type Chunk = Result<Bytes, std::io::Error>;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The client closed the connection: nobody is left to tell.
    #[error("the client hung up")]
    Gone,
    #[error("the client took no data for {} s; the export stopped", .0.as_secs())]
    Stalled(std::time::Duration),
    #[error("writing Parquet failed: {0}")]
    Parquet(#[from] ParquetError),
}

/// Where the encoded file goes: bytes collect here and are sent on as chunks.
struct Sink {
    buf: Vec<u8>,
    tx: mpsc::Sender<Chunk>,
    /// [`STALL`].
    stall: std::time::Duration,
}

impl Sink {
    /// Sends what is buffered; waits while the channel is full.
    fn ship(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4)));
        // On the blocking thread the export runs on: wait there, for at most `stall`.
        let sent = tokio::runtime::Handle::current().block_on(self.tx.send_timeout(Ok(chunk), self.stall));
        sent.map_err(|e| match e {
            mpsc::error::SendTimeoutError::Timeout(_) => std::io::Error::from(std::io::ErrorKind::TimedOut),
            mpsc::error::SendTimeoutError::Closed(_) => std::io::Error::from(std::io::ErrorKind::BrokenPipe),
        })
    }
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK_BYTES {
            self.ship()?;
        }
        Ok(data.len())
    }

    /// The writer flushes after every column chunk; the chunks go out at [`CHUNK_BYTES`] and at
    /// the end of each row group instead, so a flush only keeps them.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a column is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `required binary (STRING)`
    Text,
    /// `required int64 (TIMESTAMP(MILLIS,true))`
    Time,
    /// `required int64`
    Int,
    /// `optional double`: null where the value is not finite
    Float,
}

/// One column's values of the row group being filled.
struct Column {
    name: String,
    kind: Kind,
    ints: Vec<i64>,
    floats: Vec<f64>,
    texts: Vec<ByteArray>,
    /// Definition levels of a `Float` column: 1 for a value, 0 for a null.
    defs: Vec<i16>,
}

impl Column {
    fn new(name: &str, kind: Kind) -> Column {
        Column { name: name.into(), kind, ints: Vec::new(), floats: Vec::new(), texts: Vec::new(), defs: Vec::new() }
    }

    fn int(&mut self, v: i64) {
        self.ints.push(v);
    }

    fn float(&mut self, v: Option<f64>) {
        match v.filter(|v| v.is_finite()) {
            Some(v) => {
                self.floats.push(v);
                self.defs.push(1);
            }
            None => self.defs.push(0),
        }
    }

    fn schema(&self) -> String {
        match self.kind {
            Kind::Text => format!("required binary {} (STRING);", self.name),
            Kind::Time => format!("required int64 {} (TIMESTAMP(MILLIS,true));", self.name),
            Kind::Int => format!("required int64 {};", self.name),
            Kind::Float => format!("optional double {};", self.name),
        }
    }

    fn clear(&mut self) {
        self.ints.clear();
        self.floats.clear();
        self.texts.clear();
        self.defs.clear();
    }
}

/// A Parquet file being written to a response body, a row group at a time.
struct Table {
    file: SerializedFileWriter<Sink>,
    columns: Vec<Column>,
    rows: usize,
    /// The channel, to tell a client that hung up from a failure.
    tx: mpsc::Sender<Chunk>,
}

impl Table {
    fn new(name: &str, columns: Vec<Column>, tx: mpsc::Sender<Chunk>) -> Result<Table, ExportError> {
        let fields: Vec<String> = columns.iter().map(Column::schema).collect();
        let schema =
            parquet::schema::parser::parse_message_type(&format!("message {name} {{ {} }}", fields.join(" ")))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_created_by(format!("tributary-aggregator {}", env!("CARGO_PKG_VERSION")))
            .build();
        let sink = Sink { buf: Vec::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 4), tx: tx.clone(), stall: STALL };
        let file = SerializedFileWriter::new(sink, Arc::new(schema), Arc::new(properties))?;
        Ok(Table { file, columns, rows: 0, tx })
    }

    /// Counts a row whose values were pushed into every column; writes the group when full.
    fn row_done(&mut self) -> Result<(), ExportError> {
        self.rows += 1;
        if self.rows >= ROW_GROUP_ROWS {
            self.write_group()?;
        }
        Ok(())
    }

    fn write_group(&mut self) -> Result<(), ExportError> {
        if self.rows == 0 {
            return Ok(());
        }
        let written = (|| {
            let mut group = self.file.next_row_group()?;
            for column in &mut self.columns {
                let mut writer = group
                    .next_column()?
                    .ok_or_else(|| ParquetError::General(format!("no column writer for {}", column.name)))?;
                match column.kind {
                    Kind::Text => writer.typed::<ByteArrayType>().write_batch(&column.texts, None, None)?,
                    Kind::Time | Kind::Int => writer.typed::<Int64Type>().write_batch(&column.ints, None, None)?,
                    Kind::Float => {
                        writer.typed::<DoubleType>().write_batch(&column.floats, Some(&column.defs), None)?
                    }
                };
                writer.close()?;
                column.clear();
            }
            group.close()?;
            self.file.flush()?;
            self.file.inner_mut().ship()?;
            Ok::<_, ParquetError>(())
        })();
        self.rows = 0;
        written.map_err(|e| self.failed(e))
    }

    /// Writes the last row group and the footer, and sends the rest of the file.
    fn finish(mut self) -> Result<(), ExportError> {
        self.write_group()?;
        let finished = (|| {
            self.file.finish()?;
            self.file.inner_mut().ship()?;
            Ok::<_, ParquetError>(())
        })();
        finished.map_err(|e| self.failed(e))
    }

    /// A write error: the client is gone (the channel is closed), stopped reading, or the
    /// encoding failed.
    fn failed(&self, error: ParquetError) -> ExportError {
        let timed_out = matches!(&error, ParquetError::External(e)
            if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut));
        match () {
            _ if self.tx.is_closed() => ExportError::Gone,
            _ if timed_out => ExportError::Stalled(self.file.inner().stall),
            _ => ExportError::Parquet(error),
        }
    }
}

/// The response whose body a [`Table`] writes, and the table's end of the channel.
fn response(filename: &str) -> (mpsc::Sender<Chunk>, Response) {
    let (tx, rx) = mpsc::channel::<Chunk>(CHANNEL_CHUNKS);
    let body = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|chunk| (chunk, rx)) });
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", file_name(filename)))
        .unwrap_or(HeaderValue::from_static("attachment"));
    let headers =
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE)), (header::CONTENT_DISPOSITION, disposition)];
    (tx, (headers, axum::body::Body::from_stream(body)).into_response())
}

/// `stem` (a sensor id, say) as a file name: letters, digits, `-`, `_` and `.` kept, anything
/// else `_`, then `.parquet`.
fn file_name(stem: &str) -> String {
    let mut name: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    name.push_str(".parquet");
    name
}

/// Ends the answer when its producer failed after the response went out. The status and headers
/// are gone, so a 4xx/5xx can no longer be sent: as the streamed JSON/CSV window lists do
/// (`api::multi_windows`), the failure is logged once and the body is cut short with an error,
/// which aborts the connection; the client sees a truncated download (a Parquet file without its
/// footer, which no reader accepts). A client that hung up needs neither.
#[derive(Clone)]
pub struct Abort(mpsc::Sender<Chunk>);

impl Abort {
    /// What the producer ended with: nothing to do when it wrote the whole file (or the client
    /// left), else [`Abort::fail`] with the error.
    pub fn settle<E: std::fmt::Display>(&self, what: &str, written: Result<Result<(), ExportError>, E>) {
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.fail(what, &e),
            Err(e) => self.fail(what, &e),
        }
    }

    pub fn fail(&self, what: &str, error: &dyn std::fmt::Display) {
        if self.0.is_closed() {
            tracing::debug!(%error, "{what}: the client hung up");
            return;
        }
        tracing::warn!(%error, "{what} failed mid-answer");
        let _ = self.0.try_send(Err(std::io::Error::other(error.to_string())));
    }
}

/// A window list as Parquet: `sensor`, then the members `fields` asks for, in the JSON's order
/// (`first` and `last` as `first_ts, first_value`, `last_ts, last_value`, as in the CSV).
pub struct Windows {
    table: Table,
    fields: Fields,
}

/// A window list export named `filename` (`.parquet` is added) and the response that streams it.
pub fn windows(filename: &str, fields: Fields) -> Result<(Windows, Abort, Response), ExportError> {
    let mut columns = vec![Column::new("sensor", Kind::Text)];
    for (i, name) in FIELDS.iter().enumerate() {
        if !fields.has(i) {
            continue;
        }
        match *name {
            "start" | "end" | "updated_at" => columns.push(Column::new(name, Kind::Time)),
            "count" | "revision" => columns.push(Column::new(name, Kind::Int)),
            "first" | "last" => {
                columns.push(Column::new(&format!("{name}_ts"), Kind::Time));
                columns.push(Column::new(&format!("{name}_value"), Kind::Float));
            }
            _ => columns.push(Column::new(name, Kind::Float)),
        }
    }
    let (tx, response) = response(filename);
    let table = Table::new("windows", columns, tx.clone())?;
    Ok((Windows { table, fields }, Abort(tx), response))
}

impl Windows {
    /// Adds one window of `sensor`.
    pub fn push(&mut self, sensor: &Bytes, w: &WindowView) -> Result<(), ExportError> {
        let mut columns = self.table.columns.iter_mut();
        let mut next = || columns.next().expect("a column per member");
        next().texts.push(ByteArray::from(sensor.clone()));
        let f = self.fields;
        if f.has(0) {
            next().int(w.start);
        }
        if f.has(1) {
            next().int(w.end);
        }
        if f.has(2) {
            next().int(i64::try_from(w.count).unwrap_or(i64::MAX));
        }
        for (i, v) in [(3, w.min), (4, w.max), (5, w.mean), (6, w.stddev)] {
            if f.has(i) {
                next().float(Some(v));
            }
        }
        for (i, p) in [(7, &w.first), (8, &w.last)] {
            if f.has(i) {
                next().int(p.ts);
                next().float(Some(p.value));
            }
        }
        for (i, v) in [(9, w.p50), (10, w.p95), (11, w.p99)] {
            if f.has(i) {
                next().float(Some(v));
            }
        }
        if f.has(12) {
            next().int(i64::from(w.revision));
        }
        if f.has(13) {
            next().int(w.updated_at);
        }
        self.table.row_done()
    }

    /// Writes what is left and the footer.
    pub fn finish(self) -> Result<(), ExportError> {
        self.table.finish()
    }
}

/// A series as Parquet: `time`, then one column per aggregate (`count` a whole number, 0 for an
/// empty bucket as in the JSON; the others doubles, null for an empty bucket).
pub struct Series {
    table: Table,
}

/// A series export named `filename` for the aggregates `names` (name, whether it is a count),
/// and the response that streams it.
pub fn series(filename: &str, names: &[(&str, bool)]) -> Result<(Series, Abort, Response), ExportError> {
    let mut columns = vec![Column::new("time", Kind::Time)];
    for (name, count) in names {
        columns.push(Column::new(name, if *count { Kind::Int } else { Kind::Float }));
    }
    let (tx, response) = response(filename);
    let table = Table::new("series", columns, tx.clone())?;
    Ok((Series { table }, Abort(tx), response))
}

impl Series {
    /// Adds the bucket starting at `time`, with one value per aggregate (`None`: empty bucket).
    pub fn push(&mut self, time: i64, values: impl Iterator<Item = Option<f64>>) -> Result<(), ExportError> {
        let mut columns = self.table.columns.iter_mut();
        if let Some(column) = columns.next() {
            column.int(time);
        }
        for (column, value) in columns.zip(values) {
            match column.kind {
                Kind::Int => column.int(value.map_or(0, |v| v as i64)),
                _ => column.float(value),
            }
        }
        self.table.row_done()
    }

    pub fn finish(self) -> Result<(), ExportError> {
        self.table.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Point;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;

    fn view(i: i64) -> WindowView {
        WindowView {
            start: i * 60_000,
            end: (i + 1) * 60_000,
            count: i as u64,
            min: -1.5,
            max: f64::INFINITY,
            mean: i as f64 / 3.0,
            stddev: f64::NAN,
            first: Point { ts: i * 60_000 + 1, value: 2.0 },
            last: Point { ts: i * 60_000 + 2, value: f64::NAN },
            p50: 0.0,
            p95: 0.0,
            p99: 0.0,
            revision: 3,
            updated_at: 7,
        }
    }

    /// Runs `write` on a blocking thread and collects the body, as a client would.
    async fn collect<T: Send + 'static>(
        make: impl FnOnce() -> (T, Response),
        write: impl FnOnce(T) + Send + 'static,
    ) -> Bytes {
        let (export, response) = make();
        let writer = tokio::task::spawn_blocking(move || write(export));
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        writer.await.unwrap();
        body
    }

    #[tokio::test]
    async fn window_lists_read_back_as_written_over_several_row_groups() {
        let rows = ROW_GROUP_ROWS * 2 + 17;
        let fields = Fields::parse(Some("start,count,max,stddev,last,updated_at")).unwrap();
        let body = collect(
            || {
                let (w, _, r) = windows("a/b", fields).unwrap();
                (w, r)
            },
            move |mut export| {
                let name = Bytes::from_static(b"a/b");
                for i in 0..rows as i64 {
                    export.push(&name, &view(i)).unwrap();
                }
                export.finish().unwrap();
            },
        )
        .await;
        let reader = SerializedFileReader::new(body).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 3);
        let all: Vec<_> = reader.get_row_iter(None).unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(all.len(), rows);
        let row: Vec<(String, Field)> = all[5].get_column_iter().map(|(n, f)| (n.clone(), f.clone())).collect();
        let expected = [
            ("sensor", Field::Str("a/b".into())),
            ("start", Field::TimestampMillis(300_000)),
            ("count", Field::Long(5)),
            ("max", Field::Null),
            ("stddev", Field::Null),
            ("last_ts", Field::TimestampMillis(300_002)),
            ("last_value", Field::Null),
            ("updated_at", Field::TimestampMillis(7)),
        ];
        let expected: Vec<(String, Field)> = expected.into_iter().map(|(n, f)| (n.to_string(), f)).collect();
        assert_eq!(row, expected);
    }

    /// Writes 100 row groups of windows on a blocking thread, as an export does.
    async fn write_many(mut export: Windows) -> Result<(), ExportError> {
        let name = Bytes::from_static(b"x");
        tokio::task::spawn_blocking(move || {
            for i in 0..(ROW_GROUP_ROWS * 100) as i64 {
                export.push(&name, &view(i))?;
            }
            export.finish()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_stops_the_writer() {
        let (export, _, response) = windows("x", Fields::ALL).unwrap();
        drop(response);
        let result = write_many(export).await;
        assert!(matches!(result, Err(ExportError::Gone)), "{result:?}");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_stops_the_writer_after_the_stall_limit() {
        let (mut export, _, response) = windows("x", Fields::ALL).unwrap();
        export.table.file.inner_mut().stall = std::time::Duration::from_millis(200);
        let started = std::time::Instant::now();
        let result = write_many(export).await;
        // The connection is open (the response is alive) but takes nothing.
        assert!(matches!(result, Err(ExportError::Stalled(_))), "{result:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
        drop(response);
    }

    #[tokio::test]
    async fn series_have_nulls_for_empty_buckets_and_zero_counts() {
        let body = collect(
            || {
                let (s, _, r) = series("s", &[("mean", false), ("count", true)]).unwrap();
                (s, r)
            },
            |mut export| {
                export.push(0, [Some(1.5), Some(2.0)].into_iter()).unwrap();
                export.push(60_000, [None, None].into_iter()).unwrap();
                export.finish().unwrap();
            },
        )
        .await;
        let reader = SerializedFileReader::new(body).unwrap();
        let rows: Vec<String> = reader.get_row_iter(None).unwrap().map(|r| r.unwrap().to_string()).collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[1].contains("mean: null") && rows[1].contains("count: 0"), "{rows:?}");
        assert_eq!(file_name("room 1/temp"), "room_1_temp.parquet");
    }
}
