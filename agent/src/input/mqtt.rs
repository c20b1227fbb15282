//! Client mode: the agent joins an existing broker (Mosquitto, EMQX) with a persistent session
//! (clean session off, QoS 1 subscriptions) and acknowledges each message only after its readings
//! are committed to the spool. Messages published while the agent is down wait in the broker's
//! session and arrive when it returns.
//!
//! MQTT QoS 1 is at-least-once: if the agent dies between a spool commit and the PUBACK, or the
//! connection drops with PUBACKs still due, the broker delivers those messages again (flagged
//! `dup`, counted as `tributary_agent_mqtt_redelivered_total`) and they are spooled twice.
//! Everything after the spool is exactly-once.
//!
//! Memory is bounded in bytes: a message's payload is dropped once decoded (acks wait with its
//! packet id only), the intake's pending chunk has a byte budget, and a packet may be at most
//! [`incoming_limit`] bytes, with one exception that keeps good data flowing: rumqttc drops the
//! connection on a larger packet, and the broker would redeliver it for ever; so the agent raises
//! its limit to that packet's size for the next connection only, reads it, counts it as rejected
//! (`too_large`) and acknowledges it.
//!
//! With an `mqtts://` url the agent speaks MQTT over TLS (rustls, the settings made at load from
//! `mqtt.ca_file`, `client_cert` and `client_key`). A handshake the broker or the agent refuses is
//! retried like any lost connection, and logged with the file to check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, Publish, QoS, StateError,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};

use super::Intake;
use crate::config::{Config, MqttConfig, MqttTls};

/// The largest packet MQTT allows (its remaining length field's maximum).
const MQTT_MAX_PACKET: usize = 268_435_455;
/// Outgoing packets are only subscriptions, acks and pings.
const MAX_OUTGOING_PACKET: usize = 64 * 1024;

/// The largest packet read in normal operation: a payload 8 times `max_payload_bytes` (like the
/// embedded broker's limit; anything above `max_payload_bytes` is rejected anyway), plus room for
/// the longest topic.
pub fn incoming_limit(max_payload_bytes: usize) -> usize {
    max_payload_bytes.saturating_mul(8).saturating_add(64 * 1024 + 16).min(MQTT_MAX_PACKET)
}

/// An acknowledgement due once the spool has committed `intake_no`: only what the PUBACK needs,
/// not the message, so acks waiting on a slow disk hold 24 bytes each.
struct AckDue {
    intake_no: u64,
    /// The connection the message came on: acks of an earlier connection are not sent (the
    /// broker redelivers those messages, and their packet ids may be reused by then).
    connection: u64,
    pkid: u16,
    qos: QoS,
}

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
    /// With TLS: what to tell the user when a handshake fails.
    tls_hints: Option<TlsHints>,
}

impl MqttClient {
    pub fn new(config: &Config) -> Result<MqttClient, ClientError> {
        let url = config.mqtt.url.as_ref().ok_or_else(|| ClientError::Url("required in client mode".into()))?;
        let host = url.host_str().ok_or_else(|| ClientError::Url(format!("{url} has no host")))?;
        let tls = match &config.mqtt.tls {
            Some(MqttTls::Client(tls)) => Some(tls.clone()),
            _ if crate::config::is_mqtt_tls(url) => {
                return Err(ClientError::Url(format!("{url}: no TLS settings loaded (mqtt.ca_file)")));
            }
            _ => None,
        };
        let port = url.port().unwrap_or(if tls.is_some() { 8883 } else { 1883 });
        let mut options = MqttOptions::new(config.mqtt_client_id(), host, port);
        options
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(incoming_limit(config.mqtt.max_payload_bytes), MAX_OUTGOING_PACKET)
            .set_request_channel_capacity(1024)
            .set_inflight(100);
        if let Some(username) = &config.mqtt.username {
            options.set_credentials(username, &config.mqtt.password);
        } else if !url.username().is_empty() {
            options.set_credentials(url.username(), url.password().unwrap_or(""));
        }
        let tls_hints = tls.map(|tls| {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
            TlsHints::new(&config.mqtt, host)
        });
        Ok(MqttClient { options, topics: config.mqtt.topics.clone(), tls_hints })
    }

    pub async fn run(self, mut intake: Intake, mut shutdown: watch::Receiver<bool>) -> Result<(), ClientError> {
        let metrics = intake.metrics().clone();
        // Each PUBACK waits for its message's commit: under load the spool commits every
        // commit_interval, not gather_interval, so the broker's inflight window turns over quickly.
        let _acks_wait = intake.acks_wait_for_commits();
        let base_limit = self.options.max_packet_size();
        let (client, mut eventloop) = AsyncClient::new(self.options, 1024);
        let connection = Arc::new(AtomicU64::new(0));

        // Acks go out in arrival order, each once the spool has committed its message (its intake
        // number). A message whose readings were all rejected waits only for the messages before it:
        // redelivering it would not help.
        // The queue is unbounded on purpose: acks reach the broker only while this loop polls the
        // event loop, so this loop must never wait for the acker (a bounded queue deadlocks when a
        // broker sends more unacknowledged messages than it holds; Mosquitto does after a
        // reconnect). Only QoS-1/2 messages wait in it, 24 bytes each, so the broker's inflight
        // window bounds it.
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<AckDue>();
        let ack_client = client.clone();
        let mut committed = intake.committed();
        let current = connection.clone();
        let mut acker = tokio::spawn(async move {
            while let Some(due) = ack_rx.recv().await {
                if committed.wait_for(|c| *c >= due.intake_no).await.is_err() {
                    break; // the spool stopped before committing: leave the rest to redelivery
                }
                if due.connection != current.load(Ordering::Acquire) {
                    continue;
                }
                // rumqttc acks by packet id and QoS; topic and payload are long gone.
                let publish = Publish {
                    dup: false,
                    qos: due.qos,
                    retain: false,
                    topic: String::new(),
                    pkid: due.pkid,
                    payload: Default::default(),
                };
                if ack_client.ack(&publish).await.is_err() {
                    break;
                }
            }
        });

        let spool = intake.sender();
        let mut delay = Duration::from_millis(100);
        let mut ticker = intake.ticker();
        loop {
            let event = tokio::select! {
                // What the pre-filters held long enough goes out even when no message comes.
                _ = ticker.tick() => {
                    intake.tick(&mut ticker)?;
                    continue;
                }
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
                    // A limit raised for one oversized message applies to this connection only.
                    eventloop.mqtt_options.set_max_packet_size(base_limit, MAX_OUTGOING_PACKET);
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
                    if publish.dup {
                        metrics.mqtt_redelivered.inc();
                    }
                    let intake_no = intake.take(publish.topic.as_bytes(), &publish.payload);
                    intake.try_flush()?;
                    if publish.qos != QoS::AtMostOnce {
                        let due = AckDue {
                            intake_no,
                            connection: connection.load(Ordering::Relaxed),
                            pkid: publish.pkid,
                            qos: publish.qos,
                        };
                        if ack_tx.send(due).is_err() {
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.mqtt_connected.set(0);
                    connection.fetch_add(1, Ordering::AcqRel);
                    if let ConnectionError::MqttState(StateError::Deserialization(
                        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size),
                    )) = &e
                    {
                        // Read it on the next connection, to reject and acknowledge it, rather than be
                        // sent it again for ever (see the module doc).
                        let raised = (size + 16).min(MQTT_MAX_PACKET);
                        tracing::error!(
                            size,
                            limit = base_limit,
                            "the broker sent a packet above the agent's limit (8 x mqtt.max_payload_bytes); reading it \
                             once to reject it. Set the broker's message size limit (Mosquitto: message_size_limit) \
                             to at most mqtt.max_payload_bytes to keep such messages away"
                        );
                        eventloop.mqtt_options.set_max_packet_size(raised, MAX_OUTGOING_PACKET);
                    }
                    // rumqttc reconnects on the next poll at once; back off here instead of spinning.
                    let wait = delay.mul_f64(0.5 + fastrand::f64() / 2.0);
                    match &e {
                        ConnectionError::ConnectionRefused(
                            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
                        ) => tracing::error!(
                            ?code,
                            retry_in = ?wait,
                            "the MQTT broker refused the agent's login: check mqtt.username and mqtt.password \
                             (or password_file) against the broker's users"
                        ),
                        e => match self.tls_hints.as_ref().and_then(|hints| hints.explain(e)) {
                            Some(hint) => tracing::error!(error = %e, retry_in = ?wait, "{hint}"),
                            None => tracing::warn!(error = %e, retry_in = ?wait, "MQTT connection lost"),
                        },
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
        }

        // Shutdown: commit what was taken, let its acks go out, then disconnect. Messages that
        // arrive meanwhile are not acknowledged; the broker keeps them for the next session. What the
        // pre-filters hold goes too.
        intake.finish().await?;
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

/// What to check when TLS with the broker fails, naming the configured files.
struct TlsHints {
    host: String,
    ca_file: Option<String>,
    client_cert: Option<String>,
}

impl TlsHints {
    fn new(mqtt: &MqttConfig, host: &str) -> TlsHints {
        TlsHints {
            host: host.to_string(),
            ca_file: mqtt.ca_file.as_ref().map(|p| p.display().to_string()),
            client_cert: mqtt.client_cert.as_ref().map(|p| p.display().to_string()),
        }
    }

    /// A message for a connection that failed on TLS; `None` for other failures.
    fn explain(&self, e: &ConnectionError) -> Option<String> {
        let tls = rustls_error(e)?;
        let host = &self.host;
        Some(match tls {
            rustls::Error::InvalidCertificate(reason) => match &self.ca_file {
                Some(ca_file) => format!(
                    "the MQTT broker's certificate was refused ({reason:?}): check that mqtt.ca_file ({ca_file}) \
                     holds the CA that signed it, that it is valid now, and that it names {host} (the host of \
                     mqtt.url)"
                ),
                None => format!(
                    "the MQTT broker's certificate was refused ({reason:?}): it is not signed by a CA this system \
                     trusts, or does not name {host}; set mqtt.ca_file to the PEM file of the CA that signed it"
                ),
            },
            rustls::Error::AlertReceived(alert) => match &self.client_cert {
                Some(cert) => format!(
                    "the MQTT broker refused the TLS handshake ({alert:?}): check that mqtt.client_cert ({cert}) is \
                     signed by a CA the broker trusts (Mosquitto: cafile) and is valid now"
                ),
                None => format!(
                    "the MQTT broker refused the TLS handshake ({alert:?}): if it asks every client for a \
                     certificate (Mosquitto: require_certificate true), set mqtt.client_cert and client_key"
                ),
            },
            rustls::Error::InvalidMessage(_) => format!(
                "the MQTT broker at {host} does not answer in TLS: check that mqtt.url's port is its TLS listener \
                 (usually 8883), or use mqtt:// for a plain one"
            ),
            other => format!(
                "TLS with the MQTT broker failed ({other}): check mqtt.ca_file, client_cert and client_key against \
                 the broker's TLS listener"
            ),
        })
    }
}

/// The rustls verdict behind a connection error, if TLS failed: rumqttc wraps it in I/O errors.
fn rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // io::Error's source() skips the error it wraps.
        if let Some(inner) = error.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls);
            }
        }
        next = error.source();
    }
    None
}
