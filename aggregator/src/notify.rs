//! Webhooks: every alert transition is POSTed as JSON to each `[[notify]] url`, retried with
//! backoff, from a task of its own behind a bounded queue, so a slow or dead webhook never slows
//! the pipeline (a full queue drops the notification and counts it).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Notifications waiting per webhook.
const QUEUE: usize = 1_024;
/// Transitions of readings received longer ago than this are history being replayed: they are
/// stored like any other but not sent.
pub const REPLAY_AGE_MS: i64 = 10 * 60 * 1000;

/// A webhook, from `[[notify]]`.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: url::Url,
    pub timeout: Duration,
    /// Delivery attempts before a notification is given up (counted as failed).
    pub attempts: u32,
}

/// The processor's side: hands notifications to each webhook's task without waiting.
#[derive(Clone, Default)]
pub struct Notifier {
    queues: Vec<mpsc::Sender<serde_json::Value>>,
    metrics: Option<Arc<Metrics>>,
}

impl Notifier {
    /// Starts one delivery task per webhook on `runtime`.
    pub fn start(webhooks: Vec<Webhook>, metrics: Arc<Metrics>, runtime: &tokio::runtime::Handle) -> Notifier {
        if webhooks.is_empty() {
            return Notifier { queues: Vec::new(), metrics: Some(metrics) };
        }
        let client = match reqwest::Client::builder().build() {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, "cannot build the webhook HTTP client; notifications are off");
                return Notifier::default();
            }
        };
        let mut queues = Vec::new();
        for hook in webhooks {
            let (tx, rx) = mpsc::channel(QUEUE);
            runtime.spawn(deliver(hook, client.clone(), rx, metrics.clone()));
            queues.push(tx);
        }
        Notifier { queues, metrics: Some(metrics) }
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queues `body` for every webhook; never waits.
    pub fn send(&self, body: serde_json::Value) {
        for queue in &self.queues {
            if queue.try_send(body.clone()).is_err() {
                if let Some(m) = &self.metrics {
                    m.notify("dropped");
                }
                tracing::warn!("webhook queue full: a notification was dropped");
            }
        }
    }
}

async fn deliver(
    hook: Webhook,
    client: reqwest::Client,
    mut rx: mpsc::Receiver<serde_json::Value>,
    metrics: Arc<Metrics>,
) {
    while let Some(body) = rx.recv().await {
        let mut delay = Duration::from_millis(200);
        let mut delivered = false;
        for attempt in 1..=hook.attempts.max(1) {
            let result = client.post(hook.url.clone()).timeout(hook.timeout).json(&body).send().await;
            match result {
                Ok(r) if r.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(r) => {
                    tracing::warn!(url = %hook.url, status = %r.status(), attempt, "webhook refused a notification")
                }
                Err(error) => tracing::warn!(url = %hook.url, %error, attempt, "webhook unreachable"),
            }
            if attempt < hook.attempts {
                metrics.notify("retried");
                tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
        metrics.notify(if delivered { "delivered" } else { "failed" });
    }
}
