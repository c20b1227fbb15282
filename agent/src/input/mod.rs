//! Where readings come from: the embedded MQTT broker ([`broker`]) or an existing broker joined as
//! a client ([`mqtt`]). Both decode messages with [`Decoder`] and queue the readings on the spool.

pub mod broker;
pub mod mqtt;

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::decode::Decoder;
use crate::metrics::Metrics;
use crate::spool::{Command, Spool, SpoolError, now_ms};

/// Decodes messages and hands their readings to the spool, counting what it rejects.
#[derive(Clone)]
pub struct Intake {
    pub decoder: Decoder,
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
}

impl Intake {
    /// Queues the message's readings. Returns `false` if it held none (everything rejected), in
    /// which case `committed` is dropped unfired and the caller decides what to acknowledge.
    pub async fn take(
        &self,
        topic: &[u8],
        payload: &[u8],
        committed: Option<oneshot::Sender<()>>,
    ) -> Result<bool, SpoolError> {
        self.metrics.messages.inc();
        let mut readings = Vec::new();
        self.decoder.decode(topic, payload, now_ms(), &mut readings, |reason| {
            tracing::debug!(topic = %String::from_utf8_lossy(topic), reason = reason.label(), "rejected");
            self.metrics.reject(reason);
        });
        if readings.is_empty() {
            return Ok(false);
        }
        self.metrics.readings_accepted.inc_by(readings.len() as u64);
        self.spool.send(Command::Append { readings, committed }).await?;
        Ok(true)
    }
}
