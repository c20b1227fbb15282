//! The Tributary gateway agent.
//!
//! Data flows one way: an input ([`input::broker`], the embedded MQTT broker, or [`input::mqtt`],
//! a client of an existing broker) decodes and validates messages ([`decode`]) and queues the
//! readings on the [`spool`], which commits them to SQLite in blocks; the [`forward`]er sends the
//! blocks to the aggregator and has the spool delete what was acknowledged. [`http`] serves health
//! and [`metrics`]. [`run`] wires the parts together and stops them in order.
//! Serial ports ([`input::serial`]) are read beside the MQTT input, into the same spool.
//! Every input's [`input::Intake`] runs the pre-[`filter`]s before the spool.
//! A configuration read again on SIGHUP ([`reload`]) changes filters, serial ports and the upstream
//! token in place; the rest waits for a restart.
//! The [`clock`] stamps readings; until the gateway clock is first synchronised, what the agent
//! stamps is held and re-stamped once it is.

pub mod clock;
pub mod config;
pub mod decode;
pub mod filter;
pub mod forward;
pub mod health;
pub mod http;
pub mod input;
pub mod metrics;
pub mod reload;
pub mod salvage;
pub mod spool;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::clock::{Clock, ClockWatcher};
use crate::config::{Config, MqttMode};
use crate::decode::Decoder;
use crate::forward::Forwarder;
use crate::input::Intake;
use crate::input::broker::{BrokerError, EmbeddedBroker};
use crate::input::mqtt::{ClientError, MqttClient};
use crate::input::serial::SerialPorts;
use crate::metrics::Metrics;
use crate::reload::{Reload, Reloader};
use crate::spool::{Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("http.listen {addr}: cannot listen: {source}")]
    HttpBind { addr: SocketAddr, source: std::io::Error },
    #[error("http server: {0}")]
    Http(std::io::Error),
    #[error("a task of the agent failed: {0}")]
    Task(String),
}

/// Runs the agent until `shutdown` resolves or a part fails; then stops the input, commits what
/// it queued, stops the forwarder and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    run_with_reload(config, shutdown, None).await
}

/// [`run`], taking configurations read again (SIGHUP): filters, serial ports and the upstream
/// token apply at once, without dropping MQTT connections or the spool (a 401 is fixed so);
/// other changes wait for a restart (see [`reload`]).
pub async fn run_with_reload(
    config: Config,
    shutdown: impl Future<Output = ()>,
    mut reload: Option<mpsc::Receiver<Reload>>,
) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::new());
    let (spool, spool_thread) = Spool::open(&config.data_dir, &config.spool, metrics.clone())?;
    let http = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|source| AgentError::HttpBind { addr: config.http.listen, source })?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let decoder = Decoder::new(
        &config.mqtt.topics,
        config.mqtt.max_payload_bytes,
        config.validation.max_clock_skew.as_millis() as i64,
    );
    let decoder = decoder
        .with_caps(config.mqtt.max_readings_per_message, config.validation.max_new_sensors_per_minute)
        .with_device_policy(
            config.clock.on_device_skew,
            config.clock.max_device_age.map(|age| i64::try_from(age.as_millis()).unwrap_or(i64::MAX)),
        );
    // Stamps every input's readings; see `clock` for what happens before it is synchronised.
    let clock = Arc::new(Clock::from_config(&config.clock));
    // Every input's intake, and the intakes of serial ports started later, take filter rules from here.
    let (filters_tx, filters_rx) = watch::channel(config.filter.as_slice().into());
    let intake = Intake::new(decoder, &spool, metrics.clone(), config.spool.max_queued_readings)
        .with_filter_updates(filters_rx)
        .with_clock(clock.clone());
    // Each serial port reads into its own intake; the spool's group commit batches them all.
    let mut serial =
        SerialPorts::start(&config.serial, intake.another(), config.validation.max_clock_skew.as_millis() as i64);
    let health = (!config.health.interval.is_zero()).then(|| {
        let intake = intake.another();
        let health = health::Health {
            agent_id: config.agent_id.clone(),
            data_dir: config.data_dir.clone(),
            interval: config.health.interval,
            metrics: metrics.clone(),
        };
        tokio::spawn(health.run(intake, stop_rx.clone()))
    });
    let mut input = match config.mqtt.mode {
        MqttMode::Embedded => {
            let broker = EmbeddedBroker::start(&config.mqtt).await?;
            let stop = stop_rx.clone();
            tokio::spawn(async move { broker.run(intake, stop).await.map_err(AgentError::from) })
        }
        MqttMode::Client => {
            let client = MqttClient::new(&config)?;
            let stop = stop_rx.clone();
            tokio::spawn(async move { client.run(intake, stop).await.map_err(AgentError::from) })
        }
    };
    let (token_tx, token_rx) = watch::channel(config.upstream.token.clone());
    let mut reloader = Reloader::new(config.clone(), filters_tx, token_tx, metrics.clone());
    let watcher = ClockWatcher { clock: clock.clone(), spool: spool.clone(), metrics: metrics.clone() };
    let watcher = tokio::spawn(watcher.run(stop_rx.clone()));
    let forwarder = Forwarder {
        clock,
        hold_unsynced: config.clock.hold_unsynced,
        spool,
        agent_id: config.agent_id.clone(),
        config: config.upstream.clone(),
        metrics: metrics.clone(),
        token: token_rx,
    };
    let forwarder = tokio::spawn(forwarder.run(stop_rx.clone()));
    let mut http_stop = stop_rx.clone();
    let http_server = tokio::spawn(async move {
        axum::serve(http, http::router(metrics))
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|stop| *stop).await;
            })
            .await
    });
    tracing::info!(agent_id = %config.agent_id, mode = ?config.mqtt.mode, http = %config.http.listen, "agent running");

    tokio::pin!(shutdown);
    let input_ended = loop {
        tokio::select! {
            _ = &mut shutdown => break None,
            r = &mut input => break Some(flatten(r)),
            new = next_reload(&mut reload) => reloader.apply(new, &mut serial).await,
        }
    };
    let _ = stop_tx.send(true);
    serial.stop();
    let mut result = match input_ended {
        // Asked to stop: the input drains what its broker holds for us and ends.
        None => flatten(input.await),
        Some(Ok(())) => Err(AgentError::Task("the input stopped on its own".into())),
        Some(Err(e)) => Err(e),
    };
    if let Some(health) = health {
        result = result.and(health.await.map_err(|e| AgentError::Task(e.to_string())).and_then(|r| Ok(r?)));
    }
    // The serial inputs hand over what they read and end.
    result = result.and(serial.join().await);
    let _ = forwarder.await;
    let _ = watcher.await;
    match http_server.await {
        Ok(Err(e)) => result = result.and(Err(AgentError::Http(e))),
        Err(e) => result = result.and(Err(AgentError::Task(e.to_string()))),
        Ok(Ok(())) => {}
    }
    // Input and forwarder are gone, and with them every sender of the spool's queue: the writer
    // commits what is queued and ends.
    let _ = tokio::task::spawn_blocking(move || spool_thread.join()).await;
    tracing::info!("agent stopped");
    result
}

/// The next configuration read again; never, without a channel or once it has closed.
async fn next_reload(reload: &mut Option<mpsc::Receiver<Reload>>) -> Reload {
    if let Some(channel) = reload {
        if let Some(new) = channel.recv().await {
            return new;
        }
    }
    *reload = None;
    std::future::pending().await
}

fn flatten(r: Result<Result<(), AgentError>, tokio::task::JoinError>) -> Result<(), AgentError> {
    r.map_err(|e| AgentError::Task(e.to_string()))?
}
