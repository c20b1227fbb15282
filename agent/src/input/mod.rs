//! Where readings come from: the embedded MQTT broker ([`broker`]) or an existing broker joined as
//! a client ([`mqtt`]). Both decode messages with [`Decoder`] into an [`Intake`], which hands
//! chunks of readings to the spool. Serial ports ([`serial`]) decode their own bytes and queue
//! readings on an [`Intake`] of their own. Either way every reading goes through the intake's
//! pre-filters ([`crate::filter`]) before the spool, so what they drop never costs a flash write;
//! each input's loop runs [`Intake::tick`] on [`Intake::ticker`] (to emit what a quiet sensor's
//! filters hold) and ends with [`Intake::finish`] (to hand held readings over at a clean stop).

pub mod broker;
pub mod mqtt;
pub mod serial;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::decode::Decoder;
use crate::filter::{FilterConfig, FilterCounters, Filters};
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
    filters: Filters,
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
            pending: Chunk::default(),
            pending_ids: 0,
            pending_bytes: 0,
            last: 0,
            max_pending,
            filters: Filters::new(&[], FilterCounters::new(&metrics)),
            metrics,
        }
    }

    /// Runs `[[filter]]` rules on every reading before it is queued.
    pub fn with_filters(mut self, config: &[FilterConfig]) -> Intake {
        self.filters = Filters::new(config, FilterCounters::new(&self.metrics));
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Decodes one message into the pending chunk, through the filters. Returns the intake number
    /// to wait for before acknowledging the message: its own, or, if it queued no readings (all
    /// rejected, or dropped or held by the filters), the previous message's.
    pub fn take(&mut self, topic: &[u8], payload: &[u8]) -> u64 {
        let Intake { decoder, pending, pending_ids, pending_bytes, metrics, filters, .. } = self;
        metrics.messages.inc();
        let now = now_ms();
        let mut queued = 0usize;
        let mut push = |sensor: &str, ts: i64, value: f64| {
            queued += 1;
            push_reading(pending, pending_ids, pending_bytes, sensor, ts, value);
        };
        let readings = decoder.decode(
            topic,
            payload,
            now,
            // Without filters, `apply` hands each reading straight to `push`.
            |sensor, ts, value| filters.apply(sensor, ts, value, now, &mut push),
            |reason| {
                tracing::debug!(topic = %String::from_utf8_lossy(topic), reason = reason.label(), "rejected");
                metrics.reject(reason);
            },
        );
        if readings > 0 {
            metrics.readings_accepted.inc_by(readings as u64);
        }
        // A message whose readings were all filtered out takes no number: its ack must not wait
        // for a commit that may not come for a while (client mode would stall its inflight window).
        if queued > 0 {
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
        self.metrics.readings_accepted.inc();
        let Intake { pending, pending_ids, pending_bytes, filters, .. } = self;
        let mut push =
            |sensor: &str, ts: i64, value: f64| push_reading(pending, pending_ids, pending_bytes, sensor, ts, value);
        filters.apply(sensor, ts, value, now_ms(), &mut push);
        self.pending.through = self.pending.through.max(*self.committed.borrow());
    }

    /// A timer for [`Intake::tick`]: as often as the filters need it (every second or faster),
    /// hourly without filters (a no-op then). Late ticks are delayed, not bunched.
    pub fn ticker(&self) -> tokio::time::Interval {
        let period = self.filters.tick_period().unwrap_or(std::time::Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    }

    /// Queues what the filters held long enough (a quiet sensor's downsample interval, a
    /// spike-held reading past `max_hold`) and hands it over if the writer has room.
    pub fn tick(&mut self) -> Result<(), SpoolError> {
        if self.filters.is_empty() {
            return Ok(());
        }
        let Intake { pending, pending_ids, pending_bytes, filters, .. } = self;
        filters.tick(now_ms(), &mut |sensor, ts, value| {
            push_reading(pending, pending_ids, pending_bytes, sensor, ts, value)
        });
        // Nothing acknowledges these readings: carry the number already committed (see take_reading).
        self.pending.through = self.pending.through.max(*self.committed.borrow());
        self.try_flush()
    }

    /// At a clean stop: queues everything the filters hold, then hands the chunk over.
    pub async fn finish(&mut self) -> Result<(), SpoolError> {
        let Intake { pending, pending_ids, pending_bytes, filters, .. } = self;
        filters.finish(now_ms(), &mut |sensor, ts, value| {
            push_reading(pending, pending_ids, pending_bytes, sensor, ts, value)
        });
        self.pending.through = self.pending.through.max(*self.committed.borrow());
        self.flush().await
    }
}

/// Appends a reading to the pending chunk, counting its bytes (and its sensor id's, the first time
/// the chunk sees it) so that the byte budget of [`Intake::is_full`] bounds every input.
fn push_reading(
    pending: &mut Chunk,
    pending_ids: &mut usize,
    pending_bytes: &mut usize,
    sensor: &str,
    ts: i64,
    value: f64,
) {
    let index = pending.readings.intern(sensor);
    if index as usize == *pending_ids {
        *pending_ids += 1;
        *pending_bytes += ID_OVERHEAD_BYTES + 2 * sensor.len();
    }
    pending.readings.push_interned(index, ts, value);
    *pending_bytes += READING_BYTES;
}
