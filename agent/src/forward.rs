//! The forwarder: sends spooled blocks to the aggregator in order, one request at a time, and
//! tells the spool to delete what the aggregator acknowledged.
//!
//! One request in flight keeps the aggregator's view simple: it sees each (agent, epoch) in
//! sequence order, so anything below its high-water mark is a duplicate and a jump is a real gap.
//! A failed request is retried with exponential backoff and full jitter; the data stays spooled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use tokio::sync::watch;
use tributary_shared::batch::POSTCARD_CONTENT_TYPE;
use tributary_shared::{Batch, IngestAck, WireBlock};

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::spool::{Command, Spool, StoredBlock};

/// Request bodies stay well under the aggregator's body limit.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Deleting acknowledged blocks costs a spool commit of its own when no readings arrive to share
/// it. A gateway that forwards a few readings at a time deletes at most once a second, not after
/// every request: that halves its commits (and the bytes written to flash). A crash before the
/// delete only makes the agent resend what the aggregator then drops as duplicates.
const DELETE_INTERVAL: Duration = Duration::from_secs(1);
/// Batches this large are deleted at once: the agent is busy (the delete shares a commit with new
/// readings anyway) or catching up after an outage, when a full spool must not hold delivered
/// blocks that its size limit would then count as dropped.
const DELETE_NOW_READINGS: u64 = 100;

pub struct Forwarder {
    pub spool: Spool,
    pub agent_id: String,
    pub config: UpstreamConfig,
    pub metrics: Arc<Metrics>,
}

/// How a request went, from the forwarder's point of view.
enum Outcome {
    Acked(IngestAck),
    /// Network error, 5xx, timeout, or refused credentials: keep the data, wait, try again.
    Retry(String),
    /// 400: the aggregator cannot use this batch as it is.
    Malformed(String),
    /// 413: too big; send less at a time.
    TooLarge,
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

impl Forwarder {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let client = match reqwest::Client::builder().timeout(self.config.timeout).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the HTTP client; forwarding is off");
                return;
            }
        };
        let url = match self.config.url.join("api/v1/ingest") {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(error = %e, "upstream.url cannot be joined with api/v1/ingest");
                return;
            }
        };
        let mut end = self.spool.end();
        let mut backoff = Backoff { initial: self.config.retry_initial, max: self.config.retry_max, attempt: 0 };
        let mut cursor = 0u64;
        let mut max_readings = self.config.batch_max_readings;
        // After a 400 on a batch of several blocks, send one block at a time up to here, to find
        // the one the aggregator refuses without setting aside its good neighbours.
        let mut single_until = 0u64;
        // The aggregator's latest `next_seq`, not yet passed to the spool for deletion.
        let mut undeleted: Option<u64> = None;
        let mut last_delete = Instant::now() - DELETE_INTERVAL;

        while !*shutdown.borrow() {
            let limit = if cursor < single_until { 1 } else { max_readings };
            let blocks = match self.spool.read_from(cursor, limit, MAX_BATCH_BYTES).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the spool");
                    if sleep_or_shutdown(backoff.next(), &mut shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            let Some(last) = blocks.last() else {
                // Nothing to send: wait for the next commit, deleting what was acknowledged meanwhile.
                end.borrow_and_update();
                tokio::select! {
                    _ = end.changed() => {}
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep_until((last_delete + DELETE_INTERVAL).into()), if undeleted.is_some() => {
                        if let Some(next_seq) = undeleted.take() {
                            if self.spool.send(Command::Ack { next_seq }).await.is_err() {
                                break;
                            }
                            last_delete = Instant::now();
                        }
                    }
                }
                continue;
            };
            let batch_end = last.first_seq + u64::from(last.count);
            let readings: u64 = blocks.iter().map(|b| u64::from(b.count)).sum();

            let outcome = tokio::select! {
                o = self.post(&client, &url, &blocks) => o,
                _ = shutdown.changed() => break,
            };
            match outcome {
                Outcome::Acked(ack) => {
                    self.metrics.forward_outcome("ok");
                    self.metrics.readings_forwarded.inc_by(readings.min(ack.accepted + ack.duplicates));
                    backoff.reset();
                    max_readings = self.config.batch_max_readings;
                    if ack.next_seq < batch_end {
                        tracing::warn!(
                            next_seq = ack.next_seq,
                            batch_end,
                            "aggregator acknowledged less than was sent"
                        );
                    }
                    cursor = cursor.max(ack.next_seq);
                    undeleted = Some(ack.next_seq);
                    if readings >= DELETE_NOW_READINGS || last_delete.elapsed() >= DELETE_INTERVAL {
                        if self.spool.send(Command::Ack { next_seq: ack.next_seq }).await.is_err() {
                            break;
                        }
                        undeleted = None;
                        last_delete = Instant::now();
                    }
                }
                Outcome::Retry(reason) => {
                    let delay = backoff.next();
                    tracing::warn!(%reason, retry_in = ?delay, "forwarding failed; the readings stay spooled");
                    if sleep_or_shutdown(delay, &mut shutdown).await {
                        break;
                    }
                }
                Outcome::TooLarge => {
                    self.metrics.forward_outcome("too_large");
                    max_readings = (readings as usize / 2).max(1);
                    tracing::warn!(max_readings, "aggregator says the batch is too large; sending less at a time");
                }
                Outcome::Malformed(reason) if blocks.len() > 1 => {
                    tracing::warn!(%reason, "aggregator refused a batch; resending its blocks one by one");
                    single_until = batch_end;
                }
                Outcome::Malformed(reason) => {
                    let block = &blocks[0];
                    tracing::error!(%reason, first_seq = block.first_seq, count = block.count,
                        "aggregator refused a block as malformed; moving it to the spool's dead_letters table");
                    let command = Command::DeadLetter { first_seq: block.first_seq, reason };
                    if self.spool.send(command).await.is_err() {
                        break;
                    }
                    cursor = batch_end;
                }
            }
        }
        if let Some(next_seq) = undeleted {
            let _ = self.spool.send(Command::Ack { next_seq }).await;
        }
        tracing::debug!("forwarder stopped");
    }

    async fn post(&self, client: &reqwest::Client, url: &reqwest::Url, blocks: &[StoredBlock]) -> Outcome {
        let batch = Batch {
            agent_id: &self.agent_id,
            epoch: self.spool.epoch(),
            blocks: blocks
                .iter()
                .map(|b| WireBlock { first_seq: b.first_seq, count: b.count, data: &b.data })
                .collect(),
        };
        let request = client
            .post(url.clone())
            .bearer_auth(&self.config.token)
            .header(CONTENT_TYPE, POSTCARD_CONTENT_TYPE)
            .body(batch.to_postcard());
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.forward_outcome("unreachable");
                return Outcome::Retry(format!("aggregator unreachable: {e}"));
            }
        };
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        let text = || String::from_utf8_lossy(&body).into_owned();
        match status {
            StatusCode::OK => match serde_json::from_slice::<IngestAck>(&body) {
                Ok(ack) => Outcome::Acked(ack),
                Err(e) => {
                    self.metrics.forward_outcome("server_error");
                    Outcome::Retry(format!("unreadable ack from the aggregator ({e}): {}", text()))
                }
            },
            StatusCode::BAD_REQUEST => {
                self.metrics.forward_outcome("rejected");
                Outcome::Malformed(text())
            }
            StatusCode::PAYLOAD_TOO_LARGE => Outcome::TooLarge,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                self.metrics.forward_outcome("unauthorized");
                Outcome::Retry(format!(
                    "aggregator refuses agent {:?} ({status}): check upstream.token and the aggregator's [[agents]]: {}",
                    self.agent_id,
                    text()
                ))
            }
            _ => {
                self.metrics.forward_outcome("server_error");
                Outcome::Retry(format!("aggregator answered {status}: {}", text()))
            }
        }
    }
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
}
