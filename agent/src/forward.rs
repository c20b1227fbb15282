//! The forwarder: sends spooled blocks to the aggregator, one request at a time, and tells the
//! spool to delete what the aggregator acknowledged.
//!
//! Blocks go oldest first, but live data is never stuck behind a backlog: while more than a
//! request's worth of older readings waits (after an outage), each backlog request is preceded by
//! a live one carrying the readings that came in since the last live request, at most
//! `batch_max_readings` of the newest. The dashboard is current a request or two after the link
//! returns, and the backlog fills in with the rest of the bandwidth. The aggregator takes blocks
//! in any order per (agent, epoch): below its high-water mark it logs what fills its holes and drops
//! the rest as duplicates. A range sent live is skipped by the oldest-first cursor but stays in the
//! spool until the cursor passes it (the spool deletes below a number); a crash meanwhile only
//! resends what the aggregator drops. Live ranges that jump ahead leave holes at the aggregator
//! until the backlog reaches them, so at most `MAX_LIVE_RANGES` are outstanding.
//!
//! Every failure (network, 5xx, 401/403, 413, a proxy's 400, an unknown answer) keeps the data and
//! retries with exponential backoff and full jitter. The only permanent refusal is the aggregator's
//! own `400 {"error": "invalid_block", "block": i, ...}`: that one block goes to the spool's dead
//! letters. A 413 makes the forwarder send smaller requests, splitting a block that alone is too large
//! into sub-ranges (each keeps its own sequence numbers, so the aggregator's range dedup still holds).
//!
//! The forwarder deletes and skips only what was delivered (or set aside). Before it sends readings
//! numbered after the spool was opened ([`Spool::unverified_from`]), it learns the aggregator's mark
//! for the epoch (from the ack of older blocks, or an empty batch) so that a spool that went back in
//! time renumbers them past the mark instead of having them taken for duplicates ([`Spool::verify`]);
//! nothing goes live first before that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use tokio::sync::watch;
use tributary_shared::batch::POSTCARD_CONTENT_TYPE;
use tributary_shared::block::FORMAT_FLAGGED;
use tributary_shared::{Batch, Block, BlockClock, GapReports, IngestAck, WireBlock};

use crate::clock::Clock;
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::spool::{MAX_BLOCK_READINGS, Spool, StoredBlock, slice_block};

/// Request bodies stay well under the aggregator's body limit.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// The smallest body limit a 413 can teach: below it a request holds a reading or two anyway.
const MIN_BATCH_BYTES: usize = 512;
/// A body limit learned from a 413 is forgotten after this long without one, in case the proxy
/// in the way was reconfigured; if not, the next 413 teaches it again.
const TOO_LARGE_MEMORY: Duration = Duration::from_secs(600);

/// Deleting acknowledged blocks costs a spool commit of its own when no readings arrive to share
/// it. A gateway that forwards a few readings at a time deletes at most once a second, not after
/// every request: that halves its commits (and the bytes written to flash). A crash before the
/// delete only makes the agent resend what the aggregator then drops as duplicates.
const DELETE_INTERVAL: Duration = Duration::from_secs(1);
/// Batches this large are deleted at once: the agent is busy (the delete shares a commit with new
/// readings anyway) or catching up after an outage, when a full spool must not hold delivered
/// blocks that its size limit would then count as dropped.
const DELETE_NOW_READINGS: u64 = 100;
/// Shortest time between two sends of the spool's gap reports.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long an aggregator that does not take gap reports is left alone.
const REPORT_UNSUPPORTED_RETRY: Duration = Duration::from_secs(600);
/// Most ranges sent live first (and dead letters) ahead of the oldest-first cursor. Each live range
/// that jumps ahead opens a hole at the aggregator until the backlog fills it, and the aggregator
/// keeps at most 10,000 holes per epoch; at this many, live requests carry on from where the last one
/// ended instead of jumping again.
const MAX_LIVE_RANGES: usize = 64;

pub struct Forwarder {
    pub spool: Spool,
    pub agent_id: String,
    pub config: UpstreamConfig,
    pub metrics: Arc<Metrics>,
    /// The bearer token; SIGHUP can replace it (a 401 is fixed without a restart).
    pub token: watch::Receiver<String>,
    /// Blocks stamped before the clock was synchronised wait for it up to `hold_unsynced`
    /// (`[clock]`), measured by the boot-time clock; then they go out flagged.
    pub clock: Arc<Clock>,
    pub hold_unsynced: Duration,
}

/// How a request went, from the forwarder's point of view.
enum Outcome {
    Acked(IngestAck),
    /// Keep the data, wait, try again.
    Retry(String),
    /// No answer (connection refused or lost, timeout): as `Retry`, but says nothing about the request.
    Unreachable(String),
    /// 413: the body was too large for the aggregator or a proxy in the way.
    TooLarge,
    /// 400 `invalid_block`: the aggregator refuses block `index` of the request for good.
    InvalidBlock {
        index: usize,
        reason: String,
    },
}

/// The aggregator's error body: `{"error": "<code>", "detail": "..."}`, and for `invalid_block`
/// also `"block": i, "first_seq": n, "permanent": true`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    block: Option<usize>,
    #[serde(default)]
    first_seq: Option<u64>,
    #[serde(default)]
    permanent: Option<bool>,
}

/// A block as sent: a whole stored block, or a sub-range of one.
#[derive(Debug, Clone, PartialEq)]
struct Outgoing {
    first_seq: u64,
    count: u32,
    data: Vec<u8>,
}

impl Outgoing {
    fn end(&self) -> u64 {
        self.first_seq + u64::from(self.count)
    }
}

/// How much longer a stored block waits for the clock: one stamped by the agent before the clock
/// was synchronised in this boot (`boot_id`, now `boot_ms` after boot), whose oldest reading is
/// less than `hold_ms` old by the boot-time clock. `None` for every other block: synced ones, and
/// unsynced ones of an earlier boot (nothing can re-stamp them) or held long enough, which go out
/// flagged for the aggregator to quarantine.
fn held_for(data: &[u8], boot_id: [u8; 16], boot_ms: i64, hold_ms: i64) -> Option<Duration> {
    if data.first() != Some(&FORMAT_FLAGGED) {
        return None;
    }
    let BlockClock::Unsynced { boot_id: stamped_in, offset_ms } = BlockClock::of(data).ok()? else { return None };
    if stamped_in != boot_id {
        return None;
    }
    let oldest = Block::decode(data).ok()?.entries.iter().map(|e| e.ts).min()?;
    let age = boot_ms.saturating_sub(oldest.saturating_sub(offset_ms));
    let left = hold_ms.saturating_sub(age.max(0));
    (left > 0).then(|| Duration::from_millis(left as u64))
}

/// Exponential backoff with full jitter (AWS's "full jitter": uniform in [0, min(cap, base·2ⁿ)]).
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let ceiling = self.initial.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt += 1;
        ceiling.mul_f64(fastrand::f64()).max(Duration::from_millis(10))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What the forwarder knows about the aggregator's view of this epoch.
struct Epoch {
    /// Readings from here on may collide with a lost timeline: learn the mark before sending them.
    unverified: Option<u64>,
    /// Everything from here on was numbered in this life and never sent before it.
    fresh_from: u64,
    /// The highest number the aggregator can rightly hold: past this, an ack is suspect.
    horizon: u64,
}

impl Epoch {
    /// Whether the ack of a request that ended at `batch_end` says the aggregator holds numbers
    /// this agent never sent.
    fn is_beyond(&self, next_seq: u64, batch_end: u64) -> bool {
        next_seq > self.horizon.max(batch_end)
    }
}

impl Forwarder {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let client = match self.http_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %causes(&e), "cannot build the HTTP client; forwarding is off");
                return;
            }
        };
        let url = match self.config.ingest_url() {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "upstream.url cannot be joined with api/v1/ingest");
                return;
            }
        };
        let mut end = self.spool.end();
        let mut backoff = Backoff { initial: self.config.retry_initial, max: self.config.retry_max, attempt: 0 };
        let batch_max = self.config.batch_max_readings as u64;
        // The oldest-first cursor: everything below it is in the aggregator's log or set aside.
        let mut cursor = 0u64;
        let unverified = self.spool.unverified_from();
        let mut epoch = Epoch { unverified: Some(unverified), fresh_from: unverified, horizon: unverified };
        // Ranges the cursor jumps over: dead letters (not to be sent while that commits) and ranges
        // already delivered live first.
        let mut skips: Vec<(u64, u64)> = Vec::new();
        // The end of the last live request, and whether the next request may be one: live and
        // backlog requests take turns, so neither starves the other.
        let mut live_cursor = 0u64;
        let mut live_turn = true;
        // The body size a 413 taught, and when.
        let mut max_body = MAX_BATCH_BYTES;
        let mut last_too_large: Option<Instant> = None;
        // What the aggregator acknowledged, not yet passed to the spool for deletion.
        let mut undeleted: Option<u64> = None;
        let mut last_delete = Instant::now() - DELETE_INTERVAL;
        // Reports of readings the spool dropped go to `POST /api/v1/gaps`, at most every
        // REPORT_INTERVAL, and only once the aggregator answers (an ack since the last try).
        let gaps_url = url.join("gaps").ok();
        let (mut next_report, mut answered) = (Instant::now(), false);

        while !*shutdown.borrow() {
            if answered && Instant::now() >= next_report {
                if let Some(gaps_url) = &gaps_url {
                    next_report = Instant::now() + self.report_gaps(&client, gaps_url).await;
                }
                answered = false;
            }
            if last_too_large.is_some_and(|t| t.elapsed() > TOO_LARGE_MEMORY) {
                (max_body, last_too_large) = (MAX_BATCH_BYTES, None);
            }
            let before = cursor;
            while let Some(&(_, to)) = skips.iter().find(|(from, to)| *from <= cursor && cursor < *to) {
                cursor = to;
            }
            if cursor > before {
                // Past ranges delivered live first (or set aside): the spool may delete them now.
                undeleted = Some(cursor);
            }
            skips.retain(|(_, to)| *to > cursor);
            // Mark before reading: a commit landing after the read then still wakes the wait below.
            let head = *end.borrow_and_update();
            let budget = max_body - max_body / 16;
            let (stored, held) = match self.spool.read_from(cursor, self.config.batch_max_readings, budget).await {
                Ok(b) => self.hold_unsynced(b),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool");
                    if sleep_or_shutdown(backoff.next(), &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let waiting_for_mark =
                epoch.unverified.filter(|from| stored.iter().any(|b| b.first_seq + u64::from(b.count) > *from));
            let backlog = plan(&stored, cursor, epoch.unverified, &skips, budget);
            if backlog.is_empty() {
                if let Some(from) = waiting_for_mark {
                    // Everything left was numbered since the spool was opened: ask for the mark.
                    let (outcome, _) = tokio::select! {
                        o = self.post(&client, &url, &[]) => o,
                        _ = shutdown.changed() => break,
                    };
                    match outcome {
                        Outcome::Acked(ack) => {
                            backoff.reset();
                            if !self.settle(&mut epoch, from, ack.next_seq, &mut shutdown).await {
                                break;
                            }
                        }
                        other => {
                            if self.retry_later(other, &mut backoff, &mut shutdown).await {
                                break;
                            }
                        }
                    }
                    continue;
                }
                if let Some(last) = stored.last() {
                    // Everything read was skipped (delivered live first, or set aside): move past it.
                    cursor = cursor.max(last.first_seq + u64::from(last.count));
                    undeleted = Some(cursor);
                    continue;
                }
                // Nothing to send: wait for the next commit, deleting what was acknowledged meanwhile.
                tokio::select! {
                    _ = end.changed() => {}
                    _ = shutdown.changed() => {}
                    // The hold of a block stamped before the clock was synchronised ends.
                    _ = tokio::time::sleep(held.unwrap_or_default()), if held.is_some() => {}
                    _ = tokio::time::sleep_until((last_delete + DELETE_INTERVAL).into()), if undeleted.is_some() => {
                        if let Some(next_seq) = undeleted.take() {
                            if self.spool.ack(next_seq).is_err() {
                                break;
                            }
                            last_delete = Instant::now();
                        }
                    }
                }
                continue;
            }
            // Live first: the newest readings ahead of this backlog request, once the mark is known.
            let backlog_end = backlog.last().map_or(cursor, Outgoing::end);
            let live_from = if live_turn && epoch.unverified.is_none() {
                live_start(head, backlog_end, live_cursor, batch_max, &skips)
            } else {
                None
            };
            let mut live = false;
            let mut outgoing = backlog;
            if let Some(from) = live_from {
                // The block holding `from` may start up to a block's worth of readings before it; the
                // request itself is cut to the budget by `plan_live`.
                let most = self.config.batch_max_readings.saturating_add(MAX_BLOCK_READINGS);
                match self.spool.read_from(from, most, usize::MAX).await {
                    Ok(tail) => {
                        let (tail, _) = self.hold_unsynced(tail);
                        let newest = plan_live(&tail, from, head, &skips, budget);
                        if !newest.is_empty() {
                            (outgoing, live) = (newest, true);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot read the spool's newest readings"),
                }
            }
            let batch_end = outgoing.last().map_or(cursor, Outgoing::end);
            let readings: u64 = outgoing.iter().map(|b| u64::from(b.count)).sum();

            let (outcome, body_len) = tokio::select! {
                o = self.post(&client, &url, &outgoing) => o,
                _ = shutdown.changed() => break,
            };
            // After a live request the backlog's turn, unless it got no answer at all: then the link
            // is down, and the first request once it is back should be the live one.
            live_turn = !live || matches!(outcome, Outcome::Unreachable(_));
            // Whatever the answer, the aggregator may hold what this request carried (an ack can be
            // lost after the commit); a later backlog ack that reaches that far is not suspect.
            epoch.horizon = epoch.horizon.max(batch_end);
            answered |= matches!(outcome, Outcome::Acked(_));
            match outcome {
                Outcome::Acked(ack) => {
                    let delivered = readings.min(ack.accepted + ack.duplicates);
                    self.metrics.readings_forwarded.inc_by(delivered);
                    let flagged = outgoing.iter().filter(|b| b.data.first() == Some(&FORMAT_FLAGGED));
                    self.metrics.readings_forwarded_flagged.inc_by(flagged.map(|b| u64::from(b.count)).sum());
                    if let Some(from) = epoch.unverified {
                        // This request carried only blocks older than `from`: its ack is the mark.
                        if !self.settle(&mut epoch, from, ack.next_seq, &mut shutdown).await {
                            break;
                        }
                    } else if epoch.is_beyond(ack.next_seq, batch_end) {
                        tracing::error!(
                            aggregator_mark = ack.next_seq,
                            sent_up_to = epoch.horizon,
                            epoch = self.spool.epoch(),
                            "the aggregator holds sequence numbers this agent never sent in its epoch (is a copy \
                             of this spool running on another gateway?); renumbering the unsent readings past them"
                        );
                        // Nothing from the horizon on was ever sent: it covers every request so far.
                        let from = epoch.horizon;
                        if !self.settle(&mut epoch, from, ack.next_seq, &mut shutdown).await {
                            break;
                        }
                    }
                    // Only what was sent is deleted or skipped, whatever the ack says beyond it. The
                    // mark is the aggregator's highest number: past a live request's end, not an error.
                    let acked = ack.next_seq.min(batch_end);
                    if acked < batch_end {
                        tracing::warn!(
                            next_seq = ack.next_seq,
                            batch_end,
                            "aggregator acknowledged less than was sent"
                        );
                    }
                    if live {
                        if acked < batch_end {
                            // Not skipped: the backlog sends these in turn.
                            if sleep_or_shutdown(backoff.next(), &mut shutdown).await {
                                break;
                            }
                            continue;
                        }
                        backoff.reset();
                        // The cursor jumps over it; the spool keeps it until the cursor has passed.
                        add_skip(&mut skips, outgoing[0].first_seq, batch_end);
                        live_cursor = batch_end;
                        self.metrics.readings_forwarded_live_first.inc_by(delivered);
                        continue;
                    }
                    if acked <= cursor {
                        // No progress: do not hammer the aggregator with the same request.
                        if sleep_or_shutdown(backoff.next(), &mut shutdown).await {
                            break;
                        }
                        continue;
                    }
                    backoff.reset();
                    cursor = acked;
                    undeleted = Some(acked);
                    if readings >= DELETE_NOW_READINGS || last_delete.elapsed() >= DELETE_INTERVAL {
                        if self.spool.ack(acked).is_err() {
                            break;
                        }
                        undeleted = None;
                        last_delete = Instant::now();
                    }
                }
                Outcome::TooLarge => {
                    let smaller = (body_len / 2).max(MIN_BATCH_BYTES);
                    if body_len <= MIN_BATCH_BYTES || outgoing.len() == 1 && outgoing[0].count == 1 {
                        tracing::error!(
                            body_len,
                            "the aggregator or a proxy refuses even a single reading as too large; \
                            raise the body limit on the way (e.g. nginx client_max_body_size)"
                        );
                    } else {
                        tracing::warn!(body_len, max_body = smaller, "request too large (413); sending smaller ones");
                    }
                    max_body = max_body.min(smaller);
                    last_too_large = Some(Instant::now());
                    let delay = backoff.next();
                    if sleep_or_shutdown(delay, &mut shutdown).await {
                        break;
                    }
                }
                Outcome::InvalidBlock { index, reason } => {
                    let Some(block) = outgoing.get(index) else { continue };
                    tracing::error!(%reason, first_seq = block.first_seq, count = block.count,
                        "the aggregator refuses a block for good; moving it to the spool's dead letters \
                         (see `tributary-agent spool dead-letters list`)");
                    if self.spool.dead_letter(block.first_seq, block.count, reason).is_err() {
                        break;
                    }
                    skips.push((block.first_seq, block.end()));
                }
                other => {
                    if self.retry_later(other, &mut backoff, &mut shutdown).await {
                        break;
                    }
                }
            }
        }
        if let Some(next_seq) = undeleted {
            let _ = self.spool.ack(next_seq);
        }
        tracing::debug!("forwarder stopped");
    }

    /// Cuts `stored` before the first block held for the clock (see [`held_for`]); returns what is
    /// left and how long until that block's hold ends.
    fn hold_unsynced(&self, mut stored: Vec<StoredBlock>) -> (Vec<StoredBlock>, Option<Duration>) {
        let (boot_id, boot_ms) = (self.clock.boot_id(), self.clock.boot_ms());
        let hold_ms = i64::try_from(self.hold_unsynced.as_millis()).unwrap_or(i64::MAX);
        for (i, block) in stored.iter().enumerate() {
            if let Some(left) = held_for(&block.data, boot_id, boot_ms, hold_ms) {
                stored.truncate(i);
                return (stored, Some(left));
            }
        }
        (stored, None)
    }

    /// The HTTP client, with the TLS settings the configuration made for an `https://` url.
    fn http_client(&self) -> reqwest::Result<reqwest::Client> {
        let builder = reqwest::Client::builder().timeout(self.config.timeout);
        let builder = match &self.config.tls {
            Some(tls) => builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&tls.0)),
            // Plain http: no CA store to load. reqwest's default reads the system's and fails to
            // build without one, which would stop forwarding on a gateway without CA certificates.
            None => builder.tls_certs_only(Vec::new()),
        };
        builder.build()
    }

    /// Sends what the spool has to report about readings it dropped (`POST /api/v1/gaps`) and has
    /// the spool forget what the aggregator stored; returns how long until the next try.
    async fn report_gaps(&self, client: &reqwest::Client, url: &reqwest::Url) -> Duration {
        let reports = match self.spool.gap_reports(tributary_shared::gap::MAX_GAP_REPORTS).await {
            Ok(r) if r.is_empty() => return REPORT_INTERVAL,
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the spool's gap reports");
                return REPORT_INTERVAL;
            }
        };
        let ranges: Vec<(u64, u64)> = reports.iter().map(|r| (r.from_seq, r.to_seq)).collect();
        let body = GapReports { agent_id: self.agent_id.clone(), epoch: self.spool.epoch(), gaps: reports };
        let request = client
            .post(url.clone())
            .bearer_auth(self.token.borrow().as_str())
            .header(CONTENT_TYPE, tributary_shared::batch::JSON_CONTENT_TYPE)
            .body(serde_json::to_vec(&body).unwrap_or_default());
        let sent = request.send().await;
        match sent.map(|r| r.status()) {
            Ok(status) if status.is_success() => {
                tracing::info!(reports = ranges.len(), "told the aggregator which readings the spool dropped");
                if self.spool.reported(ranges).is_err() {
                    tracing::debug!("spool closed before the gap reports were forgotten");
                }
                REPORT_INTERVAL
            }
            Ok(status) if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED => {
                tracing::warn!(%status, "the aggregator does not take gap reports (older than this agent); \
                    the gaps are still listed there, without their reasons");
                REPORT_UNSUPPORTED_RETRY
            }
            Ok(status) => {
                tracing::warn!(%status, "the aggregator refused the spool's gap reports; trying again later");
                REPORT_INTERVAL
            }
            Err(e) => {
                tracing::debug!(error = %e, "gap reports not sent; trying again later");
                REPORT_INTERVAL
            }
        }
    }

    /// Logs a failed request and waits out the backoff; true if shutdown came meanwhile.
    async fn retry_later(&self, outcome: Outcome, backoff: &mut Backoff, shutdown: &mut watch::Receiver<bool>) -> bool {
        let reason = match outcome {
            Outcome::Retry(reason) | Outcome::Unreachable(reason) => reason,
            Outcome::TooLarge => "the aggregator answered 413 to an empty batch".into(),
            Outcome::Acked(_) | Outcome::InvalidBlock { .. } => "unexpected answer".into(),
        };
        let delay = backoff.next();
        tracing::warn!(%reason, retry_in = ?delay, "forwarding failed; the readings stay spooled");
        sleep_or_shutdown(delay, shutdown).await
    }

    /// The aggregator's mark for the epoch is `mark` and nothing from `from` on was sent: have the
    /// spool renumber if it is behind, and wait until that is durable. False if the spool or the
    /// agent stopped meanwhile.
    async fn settle(&self, epoch: &mut Epoch, from: u64, mark: u64, shutdown: &mut watch::Receiver<bool>) -> bool {
        let verified = tokio::select! {
            v = self.spool.verify(from, mark) => v,
            _ = shutdown.changed() => return false,
        };
        if verified.is_err() {
            return false;
        }
        epoch.unverified = None;
        epoch.fresh_from = from.max(mark);
        epoch.horizon = epoch.horizon.max(epoch.fresh_from);
        true
    }

    /// POSTs the blocks; returns the outcome and the body's size.
    async fn post(&self, client: &reqwest::Client, url: &reqwest::Url, blocks: &[Outgoing]) -> (Outcome, usize) {
        let batch = Batch {
            agent_id: &self.agent_id,
            epoch: self.spool.epoch(),
            blocks: blocks
                .iter()
                .map(|b| WireBlock { first_seq: b.first_seq, count: b.count, data: &b.data })
                .collect(),
        };
        let body = batch.to_postcard();
        let body_len = body.len();
        let request = client
            .post(url.clone())
            .bearer_auth(self.token.borrow().as_str())
            .header(CONTENT_TYPE, POSTCARD_CONTENT_TYPE)
            // What is still waiting in the spool, for the aggregator's fleet view (catching up).
            .header(
                tributary_shared::batch::BACKLOG_HEADER,
                format!(
                    "readings={}, bytes={}",
                    self.metrics.spool_readings.get().max(0),
                    self.metrics.spool_bytes.get().max(0)
                ),
            )
            .body(body);
        let (label, outcome) = match request.send().await {
            Ok(response) => {
                let status = response.status();
                let body = response.bytes().await.unwrap_or_default();
                self.judge(status, &body, blocks)
            }
            // The aggregator is there, but the TLS handshake failed: a certificate problem, which
            // waiting will not fix; the log says which.
            Err(e) if is_tls_error(&e) => (
                "tls",
                Outcome::Retry(format!(
                    "TLS with the aggregator failed (check upstream.ca_file, client_cert and client_key, and the \
                     aggregator's [http] tls_* keys): {}",
                    causes(&e)
                )),
            ),
            Err(e) => ("unreachable", Outcome::Unreachable(format!("aggregator unreachable: {}", causes(&e)))),
        };
        self.metrics.forward_outcome(label);
        (outcome, body_len)
    }

    /// Reads an answer: the outcome label for the metrics and what to do.
    fn judge(&self, status: StatusCode, body: &[u8], blocks: &[Outgoing]) -> (&'static str, Outcome) {
        let text = || excerpt(body);
        match status {
            StatusCode::OK => match serde_json::from_slice::<IngestAck>(body) {
                Ok(ack) => ("ok", Outcome::Acked(ack)),
                Err(e) => {
                    ("server_error", Outcome::Retry(format!("unreadable ack from the aggregator ({e}): {}", text())))
                }
            },
            StatusCode::BAD_REQUEST => {
                let Ok(error) = serde_json::from_slice::<ErrorBody>(body) else {
                    // Not the aggregator's JSON: a proxy, or something else in the way. Not a verdict on the data.
                    return ("bad_request", Outcome::Retry(format!("400 that is not the aggregator's: {}", text())));
                };
                let detail = error.detail.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| error.error.clone());
                match error.error.as_str() {
                    "invalid_block" if error.permanent != Some(false) => {
                        match error.block.filter(|i| {
                            blocks.get(*i).is_some_and(|b| error.first_seq.is_none_or(|s| s == b.first_seq))
                        }) {
                            Some(index) => ("invalid_block", Outcome::InvalidBlock { index, reason: detail }),
                            None => (
                                "bad_request",
                                Outcome::Retry(format!(
                                    "400 invalid_block names no block of this request (block {:?}, first_seq {:?}): {detail}",
                                    error.block, error.first_seq
                                )),
                            ),
                        }
                    }
                    "unsupported_format" => (
                        "unsupported_format",
                        Outcome::Retry(format!(
                            "the aggregator cannot read this agent's batches (is it older than the agent? upgrade it): {detail}"
                        )),
                    ),
                    code => ("bad_request", Outcome::Retry(format!("400 {code}: {detail}"))),
                }
            }
            StatusCode::PAYLOAD_TOO_LARGE => ("too_large", Outcome::TooLarge),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => (
                "unauthorized",
                Outcome::Retry(format!(
                    "aggregator refuses agent {:?} ({status}): check upstream.token and the aggregator's [[agents]]: {}",
                    self.agent_id,
                    text()
                )),
            ),
            s if s.is_client_error() => {
                ("bad_request", Outcome::Retry(format!("aggregator answered {status}: {}", text())))
            }
            _ => ("server_error", Outcome::Retry(format!("aggregator answered {status}: {}", text()))),
        }
    }
}

/// An error with its causes, `outer: inner: innermost` (reqwest's own message is only "error
/// sending request"; the reason, e.g. "connection refused" or "invalid peer certificate", is below).
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        // io::Error displays its inner error and also returns that error's source: skip repeats.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// Whether rustls refused the connection (a certificate not trusted or not presented, no common
/// protocol) rather than the network failing.
fn is_tls_error(error: &(dyn std::error::Error + 'static)) -> bool {
    // tokio-rustls wraps rustls' error in an io::Error, and hyper-rustls that in another one; an
    // io::Error's `source()` skips the error it wraps, so look inside with `get_ref()`.
    fn is_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
        match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => is_rustls(inner),
            None => e.is::<rustls::Error>(),
        }
    }
    let mut next = Some(error);
    while let Some(e) = next {
        if is_rustls(e) {
            return true;
        }
        next = e.source();
    }
    false
}

/// The start of a body for a log line (a proxy's HTML error page can be long).
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// The next request: blocks from `cursor` on, stopping before `stop_at` (readings numbered since
/// the spool was opened, until the aggregator's mark is known) and leaving out `skips`, within
/// `budget` bytes. A block larger than the budget is split into sub-ranges that fit.
fn plan(
    stored: &[StoredBlock],
    cursor: u64,
    stop_at: Option<u64>,
    skips: &[(u64, u64)],
    budget: usize,
) -> Vec<Outgoing> {
    let mut out: Vec<Outgoing> = Vec::new();
    let mut bytes = 0usize;
    for block in stored {
        if stop_at.is_some_and(|stop| block.first_seq >= stop) {
            break;
        }
        let end = block.first_seq + u64::from(block.count);
        for (from, to) in ranges(block.first_seq.max(cursor), end, skips) {
            for piece in pieces(block, from, to, budget) {
                if !out.is_empty() && bytes + piece.data.len() > budget {
                    return out;
                }
                bytes += piece.data.len();
                out.push(piece);
            }
        }
    }
    out
}

/// Where the next live request starts, if one is due: more than `batch_max` readings not sent yet
/// lie beyond the backlog request (`backlog_end`) up to the spool's end (`head`), and some of them
/// came in after the last live request (`live_cursor`). It takes the newest `batch_max`, or carries
/// on from `live_cursor` when [`MAX_LIVE_RANGES`] ranges are already skipped.
fn live_start(head: u64, backlog_end: u64, live_cursor: u64, batch_max: u64, skips: &[(u64, u64)]) -> Option<u64> {
    let waiting: u64 = ranges(backlog_end, head, skips).iter().map(|(from, to)| to - from).sum();
    if waiting <= batch_max {
        // The next backlog request or two take it all: jumping ahead would only add a request.
        return None;
    }
    let from = if skips.len() < MAX_LIVE_RANGES {
        live_cursor.max(backlog_end).max(head.saturating_sub(batch_max))
    } else if live_cursor > backlog_end {
        live_cursor
    } else {
        return None;
    };
    (from < head).then_some(from)
}

/// A live request: readings `from..to` leaving out `skips`, split as in [`plan`]; if they do not
/// all fit in `budget` bytes, the newest that do (at least one piece).
fn plan_live(stored: &[StoredBlock], from: u64, to: u64, skips: &[(u64, u64)], budget: usize) -> Vec<Outgoing> {
    let mut out = Vec::new();
    for block in stored {
        let end = (block.first_seq + u64::from(block.count)).min(to);
        for (a, b) in ranges(block.first_seq.max(from), end, skips) {
            out.extend(pieces(block, a, b, budget));
        }
    }
    let mut bytes = 0usize;
    let fit = out
        .iter()
        .rev()
        .take_while(|piece| {
            bytes += piece.data.len();
            bytes <= budget
        })
        .count();
    out.split_off(out.len().saturating_sub(fit.max(1)))
}

/// Records `from..to` as delivered, extending the range it continues (consecutive live requests
/// stay one range).
fn add_skip(skips: &mut Vec<(u64, u64)>, from: u64, to: u64) {
    match skips.iter_mut().find(|(_, end)| *end == from) {
        Some(range) => range.1 = range.1.max(to),
        None => skips.push((from, to)),
    }
}

/// Readings `from..to` of a stored block as blocks to send: the block itself when that is all of it
/// and it fits in `budget`, else sub-ranges that do.
fn pieces(block: &StoredBlock, from: u64, to: u64, budget: usize) -> Vec<Outgoing> {
    if from == block.first_seq && to == block.first_seq + u64::from(block.count) && block.data.len() <= budget {
        vec![Outgoing { first_seq: block.first_seq, count: block.count, data: block.data.clone() }]
    } else {
        split(block, from, to, budget)
    }
}

/// `from..to` minus the skipped ranges.
fn ranges(from: u64, to: u64, skips: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = vec![(from, to)];
    for &(s, e) in skips {
        out = out
            .into_iter()
            .flat_map(|(a, b)| {
                if e <= a || b <= s {
                    vec![(a, b)]
                } else {
                    [(a, s.max(a)), (e.min(b), b)].into_iter().filter(|(x, y)| x < y).collect()
                }
            })
            .collect();
    }
    out.retain(|(a, b)| a < b);
    out
}

/// Readings `from..to` of a stored block as sub-blocks of at most `budget` bytes each, halving
/// their size until they fit (a single reading is sent whatever its size).
fn split(block: &StoredBlock, from: u64, to: u64, budget: usize) -> Vec<Outgoing> {
    let decoded = match Block::decode(&block.data) {
        Ok(b) if b.len() == block.count as usize => b,
        // Unreadable: send it whole and let the aggregator judge it (it dead-letters it).
        _ => return vec![Outgoing { first_seq: block.first_seq, count: block.count, data: block.data.clone() }],
    };
    let (mut i, end) = ((from - block.first_seq) as usize, (to - block.first_seq) as usize);
    let total = end - i;
    // A first guess from the block's bytes per reading; halved below while a piece does not fit.
    let mut per = ((total as u128 * budget as u128 / block.data.len().max(1) as u128) as usize).clamp(1, total.max(1));
    let mut out = Vec::new();
    while i < end {
        let mut n = per.min(end - i);
        let data = loop {
            let data = slice_block(&decoded, i, i + n).encode();
            if data.len() <= budget || n == 1 {
                break data;
            }
            n /= 2;
        };
        per = n;
        out.push(Outgoing { first_seq: block.first_seq + i as u64, count: n as u32, data });
        i += n;
    }
    out
}

/// Sleeps; returns true if shutdown was signalled meanwhile.
async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_shared::BlockBuilder;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2), attempt: 0 };
        let delays: Vec<Duration> = (0..12).map(|_| b.next()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[0] <= Duration::from_millis(100));
        // With full jitter, the late attempts are drawn from [0, 2 s]; twelve of them all under 100 ms
        // would mean the cap never grew.
        assert!(delays[5..].iter().any(|d| *d > Duration::from_millis(100)));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    /// A stored block of `n` noisy readings (so it stays large compressed).
    fn stored(first_seq: u64, n: usize) -> StoredBlock {
        let mut b = BlockBuilder::default();
        for i in 0..n {
            b.push(&format!("sensor-{}", i % 7), 1_764_000_000_000 + i as i64, fastrand::f64());
        }
        let block = b.finish();
        StoredBlock { first_seq, count: n as u32, data: block.encode() }
    }

    fn spans(out: &[Outgoing]) -> Vec<(u64, u32)> {
        out.iter().map(|o| (o.first_seq, o.count)).collect()
    }

    #[test]
    fn a_block_larger_than_the_budget_goes_in_sub_ranges_that_keep_their_numbers() {
        let block = stored(100, 1000);
        let budget = block.data.len() / 5;
        let out = plan(std::slice::from_ref(&block), 100, None, &[], budget);
        assert!(out.iter().all(|o| o.data.len() <= budget));
        assert_eq!(out[0].first_seq, 100);
        let decoded = Block::decode(&block.data).unwrap();
        let first = Block::decode(&out[0].data).unwrap();
        assert_eq!(first.readings().next(), decoded.readings().next());
        // The next request picks up where the cursor is, mid-block.
        let cursor = out.last().unwrap().end();
        let rest = plan(std::slice::from_ref(&block), cursor, None, &[], usize::MAX);
        assert_eq!(spans(&rest), [(cursor, (1100 - cursor) as u32)]);
        let resumed = Block::decode(&rest[0].data).unwrap();
        assert_eq!(resumed.readings().next(), decoded.readings().nth((cursor - 100) as usize));
        // Halving goes down to single readings if it must.
        let tiny = plan(std::slice::from_ref(&block), 100, None, &[], 1);
        assert_eq!(spans(&tiny), [(100, 1)]);
    }

    #[test]
    fn a_request_stops_before_unverified_readings_and_leaves_out_dead_letters() {
        let blocks = [stored(0, 10), stored(10, 10), stored(20, 10)];
        assert_eq!(spans(&plan(&blocks, 0, Some(20), &[], usize::MAX)), [(0, 10), (10, 10)]);
        assert_eq!(spans(&plan(&blocks, 0, Some(0), &[], usize::MAX)), []);
        assert_eq!(spans(&plan(&blocks, 0, None, &[(10, 20)], usize::MAX)), [(0, 10), (20, 10)]);
        assert_eq!(spans(&plan(&blocks, 0, None, &[(12, 15)], usize::MAX)), [(0, 10), (10, 2), (15, 5), (20, 10)]);
        assert_eq!(spans(&plan(&blocks, 5, None, &[], usize::MAX)), [(5, 5), (10, 10), (20, 10)]);
    }

    #[test]
    fn a_live_request_is_due_only_behind_a_backlog_and_takes_the_newest_batch() {
        // What is left after this request fits in the next one: no jumping ahead.
        assert_eq!(live_start(1_500, 1_000, 0, 1_000, &[]), None);
        // An outage's backlog: the newest batch goes first.
        assert_eq!(live_start(10_000, 1_000, 0, 1_000, &[]), Some(9_000));
        // Then only what came in since the last live request, and nothing if nothing did.
        assert_eq!(live_start(10_005, 1_000, 10_000, 1_000, &[(9_000, 10_000)]), Some(10_000));
        assert_eq!(live_start(10_000, 1_000, 10_000, 1_000, &[(9_000, 10_000)]), None);
        // Readings delivered live are not backlog: 500 + 500 wait here, one request's worth.
        assert_eq!(live_start(3_000, 1_000, 2_500, 1_000, &[(1_500, 2_500)]), None);
        // More than a batch came in since the last live request: jump to the newest again.
        assert_eq!(live_start(20_000, 1_000, 10_000, 1_000, &[(9_000, 10_000)]), Some(19_000));
        // At MAX_LIVE_RANGES ranges, carry on from the last one (no new hole at the aggregator)...
        let many: Vec<(u64, u64)> = (0..MAX_LIVE_RANGES as u64).map(|i| (2_000 + i * 100, 2_050 + i * 100)).collect();
        let last = many[MAX_LIVE_RANGES - 1].1;
        assert_eq!(live_start(50_000, 1_000, last, 1_000, &many), Some(last));
        // ...or, with no live range ahead of the backlog, leave it to the backlog.
        assert_eq!(live_start(50_000, 10_000, last, 1_000, &many), None);
    }

    #[test]
    fn a_live_request_takes_the_newest_readings_that_fit() {
        let blocks = [stored(0, 10), stored(10, 10), stored(20, 10)];
        assert_eq!(spans(&plan_live(&blocks, 15, 30, &[], usize::MAX)), [(15, 5), (20, 10)]);
        assert_eq!(spans(&plan_live(&blocks, 5, 30, &[(10, 20)], usize::MAX)), [(5, 5), (20, 10)]);
        // Nothing past the spool's end as read before (readings committed since wait their turn).
        assert_eq!(spans(&plan_live(&blocks, 15, 25, &[], usize::MAX)), [(15, 5), (20, 5)]);
        // Too large for the budget: the newest pieces that fit, not the oldest.
        let budget = blocks[2].data.len() + 1;
        assert_eq!(spans(&plan_live(&blocks, 0, 30, &[], budget)), [(20, 10)]);
        // However small the budget, the newest reading goes.
        assert_eq!(spans(&plan_live(&blocks, 0, 30, &[], 1)), [(29, 1)]);
        assert_eq!(spans(&plan_live(&blocks, 30, 30, &[], usize::MAX)), []);
    }

    #[test]
    fn consecutive_live_requests_stay_one_skipped_range() {
        let mut skips = vec![(5, 6)];
        add_skip(&mut skips, 100, 200);
        add_skip(&mut skips, 200, 250);
        add_skip(&mut skips, 300, 310);
        assert_eq!(skips, [(5, 6), (100, 250), (300, 310)]);
        // The backlog request leaves them out.
        let blocks = [stored(95, 10), stored(105, 210)];
        assert_eq!(spans(&plan(&blocks, 95, None, &skips, usize::MAX)), [(95, 5), (250, 50), (310, 5)]);
    }

    #[test]
    fn only_an_ack_beyond_everything_sent_is_suspect() {
        let epoch = Epoch { unverified: None, fresh_from: 100, horizon: 250 };
        assert!(!epoch.is_beyond(300, 300), "the ack of what was just sent");
        assert!(!epoch.is_beyond(250, 120), "what an earlier life sent");
        assert!(epoch.is_beyond(301, 300));
        assert!(epoch.is_beyond(260, 120));
    }

    fn forwarder() -> (Forwarder, tempfile::TempDir, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (spool, thread) = Spool::open(dir.path(), &Default::default(), metrics.clone()).unwrap();
        let config: crate::config::Config = crate::config::Config::parse(
            "agent_id = \"gw\"\ndata_dir = \"/x\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\ntoken = \"t\"\n",
            std::path::Path::new("agent.toml"),
        )
        .unwrap();
        let token = watch::channel(config.upstream.token.clone()).1;
        let clock = Arc::new(Clock::new(Box::new(crate::clock::SystemClock::new(crate::config::SyncCheck::None))));
        let forwarder = Forwarder {
            spool,
            agent_id: "gw".into(),
            config: config.upstream,
            metrics,
            token,
            clock,
            hold_unsynced: Duration::from_secs(600),
        };
        (forwarder, dir, thread)
    }

    #[test]
    fn only_the_aggregators_invalid_block_answer_dead_letters_and_only_the_block_it_names() {
        let (f, _dir, _thread) = forwarder();
        let blocks = [stored(0, 3), stored(3, 3)];
        let outgoing = plan(&blocks, 0, None, &[], usize::MAX);
        let invalid =
            br#"{"error":"invalid_block","detail":"reading #2: not finite","block":1,"first_seq":3,"permanent":true}"#;
        let (label, outcome) = f.judge(StatusCode::BAD_REQUEST, invalid, &outgoing);
        assert_eq!(label, "invalid_block");
        assert!(matches!(outcome, Outcome::InvalidBlock { index: 1, ref reason } if reason.contains("not finite")));
        for (status, body, expected) in [
            (StatusCode::BAD_REQUEST, &b"<html>400 Bad Request</html>"[..], "bad_request"),
            (StatusCode::BAD_REQUEST, br#"{"error":"bad_batch","detail":"epoch"}"#, "bad_request"),
            (
                StatusCode::BAD_REQUEST,
                br#"{"error":"unsupported_format","detail":"format byte 9"}"#,
                "unsupported_format",
            ),
            (StatusCode::BAD_REQUEST, br#"{"error":"invalid_block","block":1,"first_seq":99}"#, "bad_request"),
            (StatusCode::BAD_REQUEST, br#"{"error":"invalid_block","block":7,"first_seq":3}"#, "bad_request"),
            (StatusCode::BAD_REQUEST, br#"{"error":"invalid_block","block":1,"permanent":false}"#, "bad_request"),
            (StatusCode::PAYLOAD_TOO_LARGE, b"", "too_large"),
            (StatusCode::UNAUTHORIZED, b"", "unauthorized"),
            (StatusCode::FORBIDDEN, b"", "unauthorized"),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, b"", "bad_request"),
            (StatusCode::BAD_GATEWAY, b"upstream down", "server_error"),
            (StatusCode::OK, b"not json", "server_error"),
        ] {
            let (label, outcome) = f.judge(status, body, &outgoing);
            assert_eq!(label, expected, "{status} {}", String::from_utf8_lossy(body));
            if expected != "too_large" {
                assert!(matches!(outcome, Outcome::Retry(_)), "{status} {}", String::from_utf8_lossy(body));
            }
        }
    }

    #[test]
    fn only_unsynced_blocks_of_this_boot_younger_than_the_hold_are_held() {
        let boot = [4u8; 16];
        let block = |clock: BlockClock, ts: i64| {
            let mut b = tributary_shared::BlockBuilder::default();
            b.push("s", ts, 1.0);
            b.push("s", ts + 5_000, 1.0);
            Block { clock, ..b.finish() }.encode()
        };
        // Stamped 10 s after boot (1970), now 70 s after boot: 60 s old, by its oldest reading.
        let unsynced = block(BlockClock::Unsynced { boot_id: boot, offset_ms: 0 }, 10_000);
        assert_eq!(held_for(&unsynced, boot, 70_000, 600_000), Some(Duration::from_secs(540)));
        assert_eq!(held_for(&unsynced, boot, 70_000, 60_000), None, "held long enough: sent flagged");
        assert_eq!(held_for(&unsynced, [5; 16], 70_000, 600_000), None, "an earlier boot's cannot wait for anything");
        assert_eq!(held_for(&block(BlockClock::Synced, 1_764_000_000_000), boot, 70_000, 600_000), None);
        assert_eq!(held_for(&block(BlockClock::DeviceSkew, 1_764_000_000_000), boot, 70_000, 600_000), None);
    }
}
