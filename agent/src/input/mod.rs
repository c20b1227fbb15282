//! Where readings come from: the embedded MQTT broker ([`broker`]) or an existing broker joined as
//! a client ([`mqtt`]). Both decode messages with [`Decoder`] into an [`Intake`], which hands
//! chunks of readings to the spool. Serial ports ([`serial`]) decode their own bytes and queue
//! readings on an [`Intake`] of their own. Either way every reading goes through the intake's
//! pre-filters ([`crate::filter`]) before the spool, so what they drop never costs a flash write;
//! each input's loop runs [`Intake::tick`] on [`Intake::ticker`] (to emit what a quiet sensor's
//! filters hold) and ends with [`Intake::finish`] (to hand held readings over at a clean stop).
//! New filter rules (SIGHUP) reach every intake through a watch channel
//! ([`Intake::with_filter_updates`]), checked at each message, reading and tick: inputs keep running.

pub mod broker;
pub mod mqtt;
pub mod serial;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::clock::{Clock, Now};
use crate::config::SyncCheck;
use crate::decode::{Decoder, DeviceTsPolicy, Stamp};
use crate::filter::{FilterConfig, FilterCounters, Filters};
use crate::metrics::Metrics;
use crate::spool::{AckWaiters, AcksWaiting, Chunk, Command, Spool, SpoolError};

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
    /// Where an input whose acks wait for commits says so ([`Intake::acks_wait_for_commits`]).
    ack_waiters: AckWaiters,
    metrics: Arc<Metrics>,
    pending: Chunk,
    /// Sensor ids interned in `pending`, and its size in bytes (estimated from what it holds).
    pending_ids: usize,
    pending_bytes: usize,
    last: u64,
    max_pending: usize,
    filters: Filters,
    /// The `[[filter]]` rules `filters` runs, and where new ones come from if they can change while
    /// the agent runs.
    rules: FilterRules,
    filter_updates: Option<watch::Receiver<FilterRules>>,
    /// Stamps readings; until it is synchronised, agent-stamped readings go to the chunk's
    /// unsynced part (see [`crate::clock`]).
    clock: Arc<Clock>,
    /// The last reading of the clock before it was synchronised (None once it is).
    untrusted: Option<Now>,
}

/// Which part of the pending chunk a reading goes to.
#[derive(Debug, Clone, Copy)]
enum Part {
    Plain,
    /// Stamped by the agent with the clock as read then, not synchronised yet.
    Unsynced(Now),
    /// A device timestamp beyond the limits, flagged.
    Skewed,
}

impl Part {
    fn of(stamp: Stamp, now: &Now) -> Part {
        match stamp {
            Stamp::Agent if !now.trusted => Part::Unsynced(*now),
            Stamp::Skewed => Part::Skewed,
            _ => Part::Plain,
        }
    }
}

/// `[[filter]]` rules as shared by every intake.
pub type FilterRules = Arc<[FilterConfig]>;

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
            ack_waiters: spool.ack_waiters(),
            pending: Chunk::default(),
            pending_ids: 0,
            pending_bytes: 0,
            last: 0,
            max_pending,
            filters: Filters::new(&[], FilterCounters::new(&metrics)),
            rules: Arc::new([]),
            filter_updates: None,
            metrics,
            // Trusted as before the clock section existed; the agent sets its own with `with_clock`.
            clock: Arc::new(Clock::new(Box::new(crate::clock::SystemClock::new(SyncCheck::None)))),
            untrusted: None,
        }
    }

    /// Stamps readings with `clock` (shared by every input of the agent).
    pub fn with_clock(mut self, clock: Arc<Clock>) -> Intake {
        self.clock = clock;
        self
    }

    /// The decoder's rules for device timestamps (serial ports judge theirs the same way).
    pub fn device_policy(&self) -> DeviceTsPolicy {
        self.decoder.device_policy()
    }

    /// The clock, read now: `trusted` once it has been synchronised. At the first reading that
    /// finds it synchronised, whatever the filters hold goes out first, still as unsynced readings
    /// (they were stamped before), so that no held 1970 stamp reaches a plain block.
    pub fn clock_now(&mut self) -> Now {
        let now = self.clock.now();
        if !now.trusted {
            self.untrusted = Some(now);
        } else if let Some(before) = self.untrusted.take() {
            let Intake { pending, pending_ids, pending_bytes, filters, metrics, .. } = self;
            filters.finish(before.wall_ms, &mut |sensor, ts, value| {
                push_reading(pending, pending_ids, pending_bytes, metrics, Part::Unsynced(before), sensor, ts, value)
            });
            self.pending.through = self.pending.through.max(*self.committed.borrow());
        }
        now
    }

    /// Runs `[[filter]]` rules on every reading before it is queued.
    pub fn with_filters(mut self, config: &[FilterConfig]) -> Intake {
        self.filters = Filters::new(config, FilterCounters::new(&self.metrics));
        self.rules = config.into();
        self
    }

    /// Runs the rules `updates` holds, and the new ones whenever it changes (a reload): what the
    /// old rules hold is handed over first (see [`Filters::reconfigure`]).
    pub fn with_filter_updates(mut self, mut updates: watch::Receiver<FilterRules>) -> Intake {
        self.rules = updates.borrow_and_update().clone();
        self.filters = Filters::new(&self.rules, FilterCounters::new(&self.metrics));
        self.filter_updates = Some(updates);
        self
    }

    /// An intake for another input of the same agent: the same spool, decoding rules, limits and
    /// filter rules (with their updates); its own pending chunk and filter state.
    pub fn another(&self) -> Intake {
        let intake = Intake {
            decoder: self.decoder.clone(),
            tx: self.tx.clone(),
            committed: self.committed.clone(),
            ack_waiters: self.ack_waiters.clone(),
            metrics: self.metrics.clone(),
            pending: Chunk::default(),
            pending_ids: 0,
            pending_bytes: 0,
            last: 0,
            max_pending: self.max_pending,
            filters: Filters::new(&[], FilterCounters::new(&self.metrics)),
            rules: Arc::new([]),
            filter_updates: None,
            clock: self.clock.clone(),
            untrusted: None,
        };
        match &self.filter_updates {
            // The latest rules, even if this intake has not taken them yet.
            Some(updates) => intake.with_filter_updates(updates.clone()),
            None => intake.with_filters(&self.rules),
        }
    }

    /// Takes new filter rules if there are any; cheap otherwise (one atomic load).
    fn update_filters(&mut self) {
        let Some(updates) = &mut self.filter_updates else { return };
        if !updates.has_changed().unwrap_or(false) {
            return;
        }
        self.rules = updates.borrow_and_update().clone();
        let now = self.clock_now();
        let part = Part::of(Stamp::Agent, &now);
        let Intake { pending, pending_ids, pending_bytes, filters, rules, metrics, .. } = self;
        filters.reconfigure(rules, now.wall_ms, &mut |sensor, ts, value| {
            push_reading(pending, pending_ids, pending_bytes, metrics, part, sensor, ts, value)
        });
        // Nothing acknowledges the readings handed over: carry the number already committed (see take_reading).
        self.pending.through = self.pending.through.max(*self.committed.borrow());
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// For an input that acknowledges messages only once [`Spool::committed`] reaches them (client
    /// mode): while the guard lives, the spool commits every `spool.commit_interval` under load
    /// rather than every `spool.gather_interval`, so acks are not held (see [`AckWaiters`]).
    pub fn acks_wait_for_commits(&self) -> AcksWaiting {
        self.ack_waiters.hold()
    }

    /// Decodes one message into the pending chunk, through the filters. Returns the intake number
    /// to wait for before acknowledging the message: its own, or, if it queued no readings (all
    /// rejected, or dropped or held by the filters), the previous message's.
    pub fn take(&mut self, topic: &[u8], payload: &[u8]) -> u64 {
        self.update_filters();
        let now = self.clock_now();
        let Intake { decoder, pending, pending_ids, pending_bytes, metrics, filters, .. } = self;
        metrics.messages.inc();
        let mut queued = 0usize;
        let mut push = |part: Part, sensor: &str, ts: i64, value: f64| {
            queued += 1;
            push_reading(pending, pending_ids, pending_bytes, metrics, part, sensor, ts, value);
        };
        let readings = decoder.decode_stamped(
            topic,
            payload,
            now.wall_ms,
            now.trusted,
            // Without filters, `apply` hands each reading straight to `push`.
            |sensor, ts, value, stamp| {
                if stamp == Stamp::Restamped {
                    metrics.device_skew_readings.inc();
                }
                let part = Part::of(stamp, &now);
                filters.apply(sensor, ts, value, now.wall_ms, &mut |sensor, ts, value| push(part, sensor, ts, value))
            },
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
        let now = self.clock_now();
        self.take_stamped(sensor, ts, value, Stamp::Device, &now);
    }

    /// As [`Intake::take_reading`], for a reading stamped `stamp` with the clock read as `now`
    /// (from [`Intake::clock_now`]).
    pub fn take_stamped(&mut self, sensor: &str, ts: i64, value: f64, stamp: Stamp, now: &Now) {
        self.update_filters();
        self.metrics.readings_accepted.inc();
        if stamp == Stamp::Restamped {
            self.metrics.device_skew_readings.inc();
        }
        let part = Part::of(stamp, now);
        let Intake { pending, pending_ids, pending_bytes, filters, metrics, .. } = self;
        let mut push = |sensor: &str, ts: i64, value: f64| {
            push_reading(pending, pending_ids, pending_bytes, metrics, part, sensor, ts, value)
        };
        filters.apply(sensor, ts, value, now.wall_ms, &mut push);
        self.pending.through = self.pending.through.max(*self.committed.borrow());
    }

    /// A timer for [`Intake::tick`]: as often as the filters need it (every second or faster).
    /// Without filters a tick only looks for new rules: every second if they can change, else
    /// hourly (a no-op). Late ticks are delayed, not bunched.
    pub fn ticker(&self) -> tokio::time::Interval {
        let mut ticker = tokio::time::interval(self.tick_period());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    }

    fn tick_period(&self) -> Duration {
        let idle = if self.filter_updates.is_some() { Duration::from_secs(1) } else { Duration::from_secs(3600) };
        self.filters.tick_period().unwrap_or(idle)
    }

    /// Takes new filter rules (so a quiet input takes them within a second too), queues what the
    /// filters held long enough (a quiet sensor's downsample interval, a spike-held reading past
    /// `max_hold`) and hands it over if the writer has room. `ticker` (from [`Intake::ticker`]) is
    /// replaced when new rules need another period.
    pub fn tick(&mut self, ticker: &mut tokio::time::Interval) -> Result<(), SpoolError> {
        self.update_filters();
        if ticker.period() != self.tick_period() {
            *ticker = self.ticker();
        }
        if !self.filters.is_empty() {
            let now = self.clock_now();
            let part = Part::of(Stamp::Agent, &now);
            let Intake { pending, pending_ids, pending_bytes, filters, metrics, .. } = self;
            filters.tick(now.wall_ms, &mut |sensor, ts, value| {
                push_reading(pending, pending_ids, pending_bytes, metrics, part, sensor, ts, value)
            });
            // Nothing acknowledges these readings: carry the number already committed (see take_reading).
            self.pending.through = self.pending.through.max(*self.committed.borrow());
        }
        self.try_flush()
    }

    /// At a clean stop: queues everything the filters hold, then hands the chunk over.
    pub async fn finish(&mut self) -> Result<(), SpoolError> {
        let now = self.clock_now();
        let part = Part::of(Stamp::Agent, &now);
        let Intake { pending, pending_ids, pending_bytes, filters, metrics, .. } = self;
        filters.finish(now.wall_ms, &mut |sensor, ts, value| {
            push_reading(pending, pending_ids, pending_bytes, metrics, part, sensor, ts, value)
        });
        self.pending.through = self.pending.through.max(*self.committed.borrow());
        self.flush().await?;
        // The writer may be letting a quiet gateway's readings gather: commit them now.
        self.tx.send(Command::Flush).await.map_err(|_| SpoolError::Closed)
    }
}

/// Appends a reading to its part of the pending chunk, counting its bytes (and its sensor id's,
/// the first time that part sees it) so that the byte budget of [`Intake::is_full`] bounds every input.
#[allow(clippy::too_many_arguments)]
fn push_reading(
    pending: &mut Chunk,
    pending_ids: &mut usize,
    pending_bytes: &mut usize,
    metrics: &Metrics,
    part: Part,
    sensor: &str,
    ts: i64,
    value: f64,
) {
    let (builder, ts) = match part {
        Part::Plain => {
            let index = pending.readings.intern(sensor);
            if index as usize == *pending_ids {
                *pending_ids += 1;
                *pending_bytes += ID_OVERHEAD_BYTES + 2 * sensor.len();
            }
            pending.readings.push_interned(index, ts, value);
            *pending_bytes += READING_BYTES;
            return;
        }
        Part::Unsynced(now) => {
            let flagged = pending.flagged.get_or_insert_with(Box::default);
            let (clock, builder) = flagged
                .unsynced
                .get_or_insert_with(|| (now.unsynced_flag(), tributary_shared::BlockBuilder::default()));
            // Into the frame of the part's flag, so the boot-time clock stays exact if the wall
            // clock stepped meanwhile (still unsynchronised).
            let ts = match *clock {
                tributary_shared::BlockClock::Unsynced { offset_ms, .. } => {
                    ts.saturating_sub(now.offset_ms).saturating_add(offset_ms)
                }
                _ => ts,
            };
            (builder, ts)
        }
        Part::Skewed => {
            metrics.device_skew_readings.inc();
            (&mut pending.flagged.get_or_insert_with(Box::default).skewed, ts)
        }
    };
    let known = builder.sensor_count();
    let index = builder.intern(sensor);
    if index as usize == known {
        *pending_bytes += ID_OVERHEAD_BYTES + 2 * sensor.len();
    }
    builder.push_interned(index, ts, value);
    *pending_bytes += READING_BYTES;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SpoolConfig;

    fn rules(toml: &str) -> FilterRules {
        let text = format!(
            "agent_id = \"gw\"\ndata_dir = \"/tmp/x\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n{toml}"
        );
        crate::config::Config::parse(&text, std::path::Path::new("agent.toml")).unwrap().filter.into()
    }

    #[tokio::test]
    async fn new_filter_rules_reach_every_intake_and_nothing_held_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, _thread) = Spool::open(dir.path(), &SpoolConfig::default(), metrics.clone()).unwrap();
        let (updates, rx) = watch::channel(rules("[[filter]]\nsensor = \"**\"\nspike = { max_jump = 5.0 }\n"));
        let decoder = Decoder::new(&["sensors/#".into()], 1024, 300_000);
        let mut first = Intake::new(decoder, &spool, metrics, 10).with_filter_updates(rx);
        let mut second = first.another();
        let now = crate::spool::now_ms();
        for intake in [&mut first, &mut second] {
            intake.take_reading("a", now, 1.0);
            intake.take_reading("a", now + 1, 2.0);
            assert_eq!(intake.pending.len(), 1, "the second reading is held");
        }

        updates.send_replace(rules("[[filter]]\nsensor = \"**\"\nrange = { max = 10.0 }\n"));
        // At the next reading: the held one goes out first, then the new rule judges.
        first.take_reading("a", now + 2, 50.0);
        assert_eq!(first.pending.len(), 2);
        // A quiet input takes the rules at its next tick, which then runs at the new rules' pace.
        let mut ticker = second.ticker();
        assert_eq!(ticker.period(), Duration::from_millis(1_000));
        second.tick(&mut ticker).unwrap();
        assert_eq!(second.filters.held(), 0);
        assert_eq!(ticker.period(), Duration::from_secs(1));
        updates.send_replace(rules("[[filter]]\nsensor = \"**\"\ndownsample = { interval = \"1s\" }\n"));
        second.tick(&mut ticker).unwrap();
        assert_eq!(ticker.period(), Duration::from_millis(100));
        // An intake made after the reload starts with the rules in force.
        let third = first.another();
        assert_eq!(third.rules.len(), 1);
        assert!(third.rules[0].downsample.is_some());
    }
}
