//! Client mode: the agent joins an existing broker (Mosquitto, EMQX) with a persistent session
//! (clean session off, QoS 1 subscriptions) and acknowledges each message only after its readings
//! are committed to the spool. Messages published while the agent is down wait in the broker's
//! session and arrive when it returns.
//!
//! MQTT QoS 1 is at-least-once: if the agent dies between a spool commit and the PUBACK, the broker
//! delivers that message again and it is spooled twice. Everything after the spool is exactly-once.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode};
use tokio::sync::{mpsc, watch};

use super::Intake;
use crate::config::Config;

/// Accept any packet the protocol allows: refusing a large one would drop the connection, and
/// the broker would redeliver the same message for ever, blocking the good data behind it.
/// Oversized payloads are read, counted as rejected, and acknowledged.
const MAX_INCOMING_PACKET: usize = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("mqtt.url: {0}")]
    Url(String),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}

pub struct MqttClient {
    options: MqttOptions,
    topics: Vec<String>,
}

impl MqttClient {
    pub fn new(config: &Config) -> Result<MqttClient, ClientError> {
        let url = config.mqtt.url.as_ref().ok_or_else(|| ClientError::Url("required in client mode".into()))?;
        let host = url.host_str().ok_or_else(|| ClientError::Url(format!("{url} has no host")))?;
        let mut options = MqttOptions::new(config.mqtt_client_id(), host, url.port().unwrap_or(1883));
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024)
            .set_request_channel_capacity(1024)
            .set_inflight(100);
        if !url.username().is_empty() {
            options.set_credentials(url.username(), url.password().unwrap_or(""));
        }
        Ok(MqttClient { options, topics: config.mqtt.topics.clone() })
    }

    pub async fn run(self, mut intake: Intake, mut shutdown: watch::Receiver<bool>) -> Result<(), ClientError> {
        let metrics = intake.metrics().clone();
        let (client, mut eventloop) = AsyncClient::new(self.options, 1024);

        // Acks go out in arrival order, each once the spool has committed its message (its intake
        // number). A message whose readings were all rejected waits only for the messages before it:
        // redelivering it would not help.
        // The queue is unbounded on purpose: acks reach the broker only while this loop polls the
        // event loop, so this loop must never wait for the acker (a bounded queue deadlocks when a
        // broker sends more unacknowledged messages than it holds; Mosquitto does after a
        // reconnect). Its length is bounded by the intake, which is what holds this loop back.
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(u64, Publish)>();
        let ack_client = client.clone();
        let mut committed = intake.committed();
        let mut acker = tokio::spawn(async move {
            while let Some((intake_no, publish)) = ack_rx.recv().await {
                if committed.wait_for(|c| *c >= intake_no).await.is_err() {
                    break; // the spool stopped before committing: leave the rest to redelivery
                }
                if ack_client.ack(&publish).await.is_err() {
                    break;
                }
            }
        });

        let spool = intake.sender();
        let mut delay = Duration::from_millis(100);
        loop {
            let event = tokio::select! {
                // The writer has room again: hand over what piled up meanwhile.
                permit = spool.reserve(), if intake.has_pending() => {
                    match permit {
                        Ok(permit) => intake.send_with(permit),
                        Err(_) => return Err(ClientError::Spool(crate::spool::SpoolError::Closed)),
                    }
                    continue;
                }
                e = eventloop.poll(), if !intake.is_full() => e,
                _ = shutdown.changed() => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                    metrics.mqtt_connected.set(1);
                    delay = Duration::from_millis(100);
                    tracing::info!(session_present = connack.session_present, "connected to the MQTT broker");
                    for topic in &self.topics {
                        // try_: never wait on the request channel from the task that polls the event loop.
                        if let Err(e) = client.try_subscribe(topic, QoS::AtLeastOnce) {
                            tracing::error!(%topic, error = %e, "cannot subscribe");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(suback))) => {
                    if suback.return_codes.iter().any(|c| matches!(c, SubscribeReasonCode::Failure)) {
                        tracing::error!(topics = ?self.topics, "the broker refused a subscription");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let intake_no = intake.take(publish.topic.as_bytes(), &publish.payload);
                    intake.try_flush()?;
                    if ack_tx.send((intake_no, publish)).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.mqtt_connected.set(0);
                    // rumqttc reconnects on the next poll at once; back off here instead of spinning.
                    let wait = delay.mul_f64(0.5 + fastrand::f64() / 2.0);
                    tracing::warn!(error = %e, retry_in = ?wait, "MQTT connection lost");
                    delay = (delay * 2).min(Duration::from_secs(30));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }

        // Shutdown: commit what was taken, let its acks go out, then disconnect. Messages that
        // arrive meanwhile are not acknowledged; the broker keeps them for the next session.
        intake.flush().await?;
        drop(ack_tx);
        let drain = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(drain);
        loop {
            tokio::select! {
                _ = &mut acker => break,
                e = eventloop.poll() => if e.is_err() { break },
                _ = &mut drain => break,
            }
        }
        // Disconnect, then read until the broker closes the connection. Closing a socket with
        // unread data in it sends a RST, and the broker would discard the acks it had not read yet.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async { while eventloop.poll().await.is_ok() {} }).await;
        metrics.mqtt_connected.set(0);
        Ok(())
    }
}
