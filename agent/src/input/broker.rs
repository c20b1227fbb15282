//! The embedded MQTT broker (rumqttd): sensors publish to the agent itself, no broker to install.
//!
//! rumqttd acknowledges a QoS-1 publish as soon as it has it in memory, before the agent has read
//! it; the spool's group commit follows within `spool.commit_interval`. That interval is the only
//! window in which a crash can lose an acknowledged reading.
//!
//! The agent reads through a local link subscribed to `#` (one commit log inside the broker, however
//! many topics), and matches topics against its own filters. rumqttd keeps a bounded in-memory log;
//! if the agent fell so far behind that the broker evicted unread messages, the gap in the link's
//! offsets is counted as `tributary_agent_broker_dropped_total`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, Meter, Notification, RouterConfig, ServerSettings};
use tokio::sync::{oneshot, watch};

use super::Intake;
use crate::config::MqttConfig;

/// rumqttd's in-memory log per filter: segments of this size, this many kept, evicted oldest first
/// whatever the agent has read. It only has to cover the agent's scheduling delays: the agent takes
/// messages as fast as they come (they wait for a slow disk in the intake's chunk, 24 bytes a
/// reading, not here at about three times their size). 8 x 64 KiB holds at least 6,000 small
/// messages, some 50 ms at 100,000 messages/s, for about 2 MiB of memory.
const SEGMENT_BYTES: usize = 64 * 1024;
const SEGMENT_COUNT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("mqtt.listen {addr}: cannot listen: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("mqtt.listen {addr}: the embedded broker did not start listening within 5 s")]
    NotListening { addr: SocketAddr },
    #[error("embedded broker: {0}")]
    Setup(String),
    #[error("the embedded broker stopped: {0}")]
    Stopped(String),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
}

/// A running embedded broker and the agent's link into it.
pub struct EmbeddedBroker {
    _link_tx: LinkTx,
    link_rx: LinkRx,
    meters: rumqttd::meters::MetersLink,
    stopped: oneshot::Receiver<String>,
}

impl EmbeddedBroker {
    /// Starts rumqttd on its own threads and waits until it accepts connections.
    pub async fn start(config: &MqttConfig) -> Result<EmbeddedBroker, BrokerError> {
        let addr = config.listen;
        // rumqttd only logs a failed bind from its server thread; check first, to fail with a reason.
        std::net::TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, source })?;

        let mut broker = Broker::new(broker_config(config)?);
        let (mut link_tx, link_rx) =
            broker.link("tributary-agent-spool").map_err(|e| BrokerError::Setup(format!("local link: {e}")))?;
        link_tx.subscribe("#").map_err(|e| BrokerError::Setup(format!("subscribe: {e}")))?;
        let meters = broker.meters().map_err(|e| BrokerError::Setup(format!("meters link: {e}")))?;

        let (stopped_tx, stopped) = oneshot::channel();
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                // `start` runs the servers and only returns when they have all ended.
                let reason = match broker.start() {
                    Ok(()) => "its server threads ended".to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = stopped_tx.send(reason);
            })
            .map_err(|e| BrokerError::Setup(e.to_string()))?;

        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                return Err(BrokerError::NotListening { addr });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(%addr, "embedded MQTT broker listening");
        Ok(EmbeddedBroker { _link_tx: link_tx, link_rx, meters, stopped })
    }

    /// Reads messages until shutdown, then takes what the broker still holds for the agent.
    pub async fn run(mut self, mut intake: Intake, mut shutdown: watch::Receiver<bool>) -> Result<(), BrokerError> {
        let metrics = intake.metrics().clone();
        let meters = self.meters;
        let meter_task = tokio::spawn(async move {
            while let Ok(meters) = meters.next().await {
                for meter in meters {
                    if let Meter::Router(_, router) = meter {
                        metrics.broker_rejected.inc_by(router.failed_publishes as u64);
                    }
                }
            }
        });

        let spool = intake.sender();
        let mut reader = LinkReader { link_rx: self.link_rx, last_offset: None };
        let result = loop {
            tokio::select! {
                // The writer has room again: hand over what piled up meanwhile.
                permit = spool.reserve(), if intake.has_pending() => match permit {
                    Ok(permit) => intake.send_with(permit),
                    Err(_) => break Err(BrokerError::Spool(crate::spool::SpoolError::Closed)),
                },
                n = reader.link_rx.next(), if !intake.is_full() => match n {
                    Ok(Some(n)) => reader.handle(n, &mut intake).await?,
                    Ok(None) => {}
                    Err(e) => break Err(BrokerError::Stopped(format!("local link: {e}"))),
                },
                reason = &mut self.stopped => break Err(BrokerError::Stopped(reason.unwrap_or_default())),
                _ = shutdown.changed() => break Ok(()),
            }
        };
        if result.is_ok() {
            // The broker has acknowledged these; take them into the spool before stopping.
            while let Ok(Ok(Some(n))) = tokio::time::timeout(Duration::from_millis(100), reader.link_rx.next()).await {
                reader.handle(n, &mut intake).await?;
            }
            intake.flush().await?;
        }
        meter_task.abort();
        result
    }
}

struct LinkReader {
    link_rx: LinkRx,
    last_offset: Option<u64>,
}

impl LinkReader {
    async fn handle(&mut self, notification: Notification, intake: &mut Intake) -> Result<(), BrokerError> {
        match notification {
            Notification::Forward(forward) => {
                if let Some((_, offset)) = forward.cursor {
                    if let Some(last) = self.last_offset {
                        if offset > last + 1 {
                            let lost = offset - last - 1;
                            intake.metrics().broker_dropped.inc_by(lost);
                            tracing::error!(lost, "the embedded broker evicted messages before the agent read them");
                        }
                    }
                    self.last_offset = Some(offset);
                }
                intake.take(&forward.publish.topic, &forward.publish.payload);
                intake.try_flush()?;
            }
            // The router pauses a local link after a full buffer until the link says it is ready.
            Notification::Unschedule => {
                self.link_rx.wake().await.map_err(|e| BrokerError::Stopped(format!("local link: {e}")))?
            }
            _ => {}
        }
        Ok(())
    }
}

fn broker_config(mqtt: &MqttConfig) -> Result<Config, BrokerError> {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        // Payloads above max_payload_bytes still reach the agent, to be counted as rejected;
        // only far larger packets make the broker drop the client.
        max_payload_size: mqtt.max_payload_bytes.saturating_mul(8),
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };
    let server = ServerSettings {
        name: "mqtt".into(),
        listen: mqtt.listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    // MetricSettings' fields are private; its serde form is the public way to build it. rumqttd's
    // timer unwraps both intervals whichever is configured, so both must be.
    let metrics = serde_json::from_value(serde_json::json!({
        "meters": { "push_interval": 1 },
        "alerts": { "push_interval": 3600 },
    }))
    .map_err(|e| BrokerError::Setup(format!("metrics settings: {e}")))?;
    Ok(Config {
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 200,
            max_segment_size: SEGMENT_BYTES,
            max_segment_count: SEGMENT_COUNT,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        metrics: Some(metrics),
        ..Config::default()
    })
}
