//! Where readings come from: the embedded MQTT broker ([`broker`]) or an existing broker joined as
//! a client ([`mqtt`]). Both decode messages with [`Decoder`] into an [`Intake`], which hands
//! chunks of readings to the spool. Serial ports ([`serial`]) decode their own bytes and queue
//! readings on an [`Intake`] of their own.

pub mod broker;
pub mod mqtt;
pub mod serial;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::decode::Decoder;
use crate::metrics::Metrics;
use crate::spool::{Chunk, Command, Spool, SpoolError, now_ms};

/// Decodes messages into a pending [`Chunk`] and hands it to the spool writer whenever the
/// writer's queue has room. While the writer is busy, the chunk grows, up to `max_pending`
/// readings or their budget in bytes ([`READING_BYTES`] each, the chunk's copies of its sensor ids
/// counted too, so a flood of long distinct ids cannot outgrow it); past that the input waits (in
/// client mode the broker then holds the messages).
///
/// Every message that yields readings gets an intake number; once [`Spool::committed`] reaches
/// it, the message is durable (client mode acknowledges by it).
pub struct Intake {
    decoder: Decoder,
    tx: mpsc::Sender<Command>,
    committed: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    pending: Chunk,
    /// Sensor ids interned in `pending`, and its size in bytes (estimated from what it holds).
    pending_ids: usize,
    pending_bytes: usize,
    last: u64,
    max_pending: usize,
}

/// What a reading costs in a chunk (sensor index, timestamp, value, with alignment).
pub const READING_BYTES: usize = 24;
/// What an interned sensor id costs in a chunk besides its text (held twice: list and index).
const ID_OVERHEAD_BYTES: usize = 96;

impl Intake {
    pub fn new(decoder: Decoder, spool: &Spool, metrics: Arc<Metrics>, max_pending: usize) -> Intake {
        Intake {
            decoder,
            tx: spool.sender(),
            committed: spool.committed(),
            metrics,
            pending: Chunk::default(),
            pending_ids: 0,
            pending_bytes: 0,
            last: 0,
            max_pending,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Decodes one message into the pending chunk. Returns the intake number to wait for before
    /// acknowledging the message: its own, or, if it held no readings, the previous message's.
    pub fn take(&mut self, topic: &[u8], payload: &[u8]) -> u64 {
        let Intake { decoder, pending, pending_ids, pending_bytes, metrics, .. } = self;
        metrics.messages.inc();
        let readings = decoder.decode(
            topic,
            payload,
            now_ms(),
            |sensor, ts, value| {
                let index = pending.readings.intern(sensor);
                if index as usize == *pending_ids {
                    *pending_ids += 1;
                    *pending_bytes += ID_OVERHEAD_BYTES + 2 * sensor.len();
                }
                pending.readings.push_interned(index, ts, value);
                *pending_bytes += READING_BYTES;
            },
            |reason| {
                tracing::debug!(topic = %String::from_utf8_lossy(topic), reason = reason.label(), "rejected");
                metrics.reject(reason);
            },
        );
        if readings > 0 {
            metrics.readings_accepted.inc_by(readings as u64);
            self.last += 1;
            self.pending.through = self.last;
        }
        self.last
    }

    /// Hands the pending chunk to the writer if its queue has room; keeps it otherwise.
    pub fn try_flush(&mut self) -> Result<(), SpoolError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (ids, bytes) = (self.pending_ids, self.pending_bytes);
        let chunk = self.take_pending();
        match self.tx.try_send(Command::Append(chunk)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Command::Append(chunk))) => {
                (self.pending, self.pending_ids, self.pending_bytes) = (chunk, ids, bytes);
                Ok(())
            }
            Err(_) => Err(SpoolError::Closed),
        }
    }

    /// Readings wait to be handed over.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The pending chunk is as large as allowed: take no more messages until it is handed over.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.max_pending || self.pending_bytes >= self.max_pending.saturating_mul(READING_BYTES)
    }

    fn take_pending(&mut self) -> Chunk {
        self.pending_ids = 0;
        self.pending_bytes = 0;
        std::mem::take(&mut self.pending)
    }

    /// The writer's queue, to wait for room on (`reserve`) alongside other events.
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }

    /// Hands the pending chunk over with a reserved queue slot.
    pub fn send_with(&mut self, permit: mpsc::Permit<'_, Command>) {
        permit.send(Command::Append(self.take_pending()));
    }

    /// Hands the pending chunk over, waiting for room (at shutdown).
    pub async fn flush(&mut self) -> Result<(), SpoolError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let chunk = self.take_pending();
        self.tx.send(Command::Append(chunk)).await.map_err(|_| SpoolError::Closed)
    }

    /// The intake number of the last committed message.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Queues one validated reading that did not come in an MQTT message (a serial port's).
    /// Nothing acknowledges it, so it takes no intake number: its chunk carries the number already
    /// committed, so that committing it never moves [`Spool::committed`] past a message not yet durable.
    pub fn take_reading(&mut self, sensor: &str, ts: i64, value: f64) {
        // Counted like `take`'s readings, so the byte budget of `is_full` bounds serial chunks too.
        let index = self.pending.readings.intern(sensor);
        if index as usize == self.pending_ids {
            self.pending_ids += 1;
            self.pending_bytes += ID_OVERHEAD_BYTES + 2 * sensor.len();
        }
        self.pending.readings.push_interned(index, ts, value);
        self.pending_bytes += READING_BYTES;
        self.metrics.readings_accepted.inc();
        self.pending.through = self.pending.through.max(*self.committed.borrow());
    }
}
