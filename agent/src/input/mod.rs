//! Where readings come from: the embedded MQTT broker ([`broker`]) or an existing broker joined as
//! a client ([`mqtt`]). Both decode messages with [`Decoder`] into an [`Intake`], which hands
//! chunks of readings to the spool.

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
/// readings; past that the input waits (in client mode the broker then holds the messages).
///
/// Every message that yields readings gets an intake number; once [`Spool::committed`] reaches
/// it, the message is durable (client mode acknowledges by it).
pub struct Intake {
    decoder: Decoder,
    tx: mpsc::Sender<Command>,
    committed: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    pending: Chunk,
    last: u64,
    max_pending: usize,
}

impl Intake {
    pub fn new(decoder: Decoder, spool: &Spool, metrics: Arc<Metrics>, max_pending: usize) -> Intake {
        Intake {
            decoder,
            tx: spool.sender(),
            committed: spool.committed(),
            metrics,
            pending: Chunk::default(),
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
        let Intake { decoder, pending, metrics, .. } = self;
        metrics.messages.inc();
        let readings = decoder.decode(
            topic,
            payload,
            now_ms(),
            |sensor, ts, value| pending.readings.push(sensor, ts, value),
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
        match self.tx.try_send(Command::Append(std::mem::take(&mut self.pending))) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(Command::Append(chunk))) => {
                self.pending = chunk;
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
        self.pending.len() >= self.max_pending
    }

    /// The writer's queue, to wait for room on (`reserve`) alongside other events.
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }

    /// Hands the pending chunk over with a reserved queue slot.
    pub fn send_with(&mut self, permit: mpsc::Permit<'_, Command>) {
        permit.send(Command::Append(std::mem::take(&mut self.pending)));
    }

    /// Hands the pending chunk over, waiting for room (at shutdown).
    pub async fn flush(&mut self) -> Result<(), SpoolError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.tx.send(Command::Append(std::mem::take(&mut self.pending))).await.map_err(|_| SpoolError::Closed)
    }

    /// The intake number of the last committed message.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Queues one validated reading that did not come in an MQTT message (a serial port's).
    /// Nothing acknowledges it, so it takes no intake number: its chunk carries the number already
    /// committed, so that committing it never moves [`Spool::committed`] past a message not yet durable.
    pub fn take_reading(&mut self, sensor: &str, ts: i64, value: f64) {
        self.pending.readings.push(sensor, ts, value);
        self.metrics.readings_accepted.inc();
        self.pending.through = self.pending.through.max(*self.committed.borrow());
    }
}
