//! Tributary's central service: agents POST batches of readings, the aggregator appends them
//! exactly once to an immutable log, a stream processor folds the log into a serving store, and
//! a JSON API and a dashboard page read the store (Kappa architecture: the log is the truth,
//! the store can always be rebuilt from it).
//!
//! Data flows one way: [`ingest`] (auth, decode, validate) → [`log`] (one writer thread, group
//! commits, range dedup by agent/epoch/sequence) → [`pipeline`] (operators tail the log by offset:
//! windows, sensor state, quarantine) → [`store`] (SQLite, results and offset committed together)
//! → [`api`] (and [`dashboard`]). [`config`] reads the TOML file, [`metrics`] serves Prometheus text.
//! [`run`] wires it all up and shuts it down in that order.
//! [`influx`] (`POST /write`, InfluxDB 1.x line protocol, for Telegraf) feeds the same log as ingest.
//! [`inspect`] (`log inspect|tail|stats`) and [`backup`] (`backup`/`restore`) are the command-line
//! tools over a data directory; [`lock`] keeps one process at a time on it.

pub mod access;
pub mod api;
pub mod backup;
pub mod config;
pub mod dashboard;
pub mod influx;
pub mod ingest;
pub mod inspect;
pub mod json;
pub mod live;
pub mod lock;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod prometheus;
pub mod series;
pub mod stale;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use config::{AgentConfig, Config, ConfigError, HttpConfig};

/// How long shutdown waits for open requests (an ingest is answered within one group commit).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Why the aggregator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create data_dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error(transparent)]
    Process(#[from] pipeline::processor::ProcessError),
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Locked(#[from] lock::LockError),
}

/// Runs the aggregator until `shutdown` completes, then stops accepting requests, answers the
/// ones in flight (their batches committed), lets the processor finish its step, and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    let addr = config.http.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    serve(config, listener, shutdown).await
}

/// [`run`] on a listener the caller has bound (e.g. to port 0).
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| Error::DataDir { path: data_dir.clone(), source })?;
    // Held until this function returns: no second aggregator, no restore underneath this one.
    let _lock = lock::DataDirLock::acquire(&data_dir)?;
    let log_path = data_dir.join("log.db");
    let store_path = data_dir.join("store.db");

    let metrics = Arc::new(metrics::Metrics::new());
    let writer_alive = Liveness::default();
    let processor_alive = Liveness::default();
    let writer = log::start(&log_path, metrics.clone(), writer_alive.clone())?;
    let notifier = notify::Notifier::start(
        config
            .notify
            .iter()
            .map(|n| notify::Webhook { url: n.url.clone(), timeout: n.timeout, attempts: n.attempts })
            .collect(),
        metrics.clone(),
        &tokio::runtime::Handle::current(),
    );
    let live = live::Hub::new();
    let processor = match pipeline::processor::start(
        &log_path,
        &store_path,
        config.pipeline_spec(),
        writer.end.clone(),
        metrics.clone(),
        processor_alive.clone(),
        pipeline::processor::Outputs {
            log: writer.handle.clone(),
            notifier: notifier.clone(),
            runtime: tokio::runtime::Handle::current(),
            live: live.clone(),
        },
    ) {
        Ok(processor) => processor,
        Err(error) => {
            stop_writer(writer).await;
            return Err(error.into());
        }
    };

    let stale_path = data_dir.join("stale.db");
    // The checker reads the store the processor has just created.
    let stale = match stale::start(config.stale_rules(), &store_path, &stale_path, notifier) {
        Ok(stale) => stale,
        Err(error) => {
            tracing::error!(%error, "stale-sensor alerts are off");
            None
        }
    };
    let state = api::AppState {
        agents: config.agents.clone().into(),
        log: writer.handle.clone(),
        store: store::StoreReader::new(&store_path),
        stale: stale.is_some().then(|| store::StoreReader::new(&stale_path)),
        layout: Arc::new(api::ApiLayout::from_config(&config)),
        metrics,
        writer_alive,
        processor_alive,
        processor_status: processor.status.clone(),
        access: Arc::new(access::Access { read_token: config.http.read_token.clone() }),
        cors_origins: config.http.cors_origins.clone().into(),
        live,
    };
    let local = listener.local_addr().map_err(Error::Serve)?;
    tracing::info!(data_dir = %data_dir.display(), agents = config.agents.len(), "listening on http://{local}");
    // Graceful shutdown waits for open requests; a client that never finishes its request must
    // not keep the process alive, so the wait is bounded.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    };
    let server = axum::serve(listener, api::router(state)).with_graceful_shutdown(shutdown);
    let grace_over = async {
        match signalled_rx.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    let served = tokio::select! {
        served = std::future::IntoFuture::into_future(server) => served,
        _ = grace_over => {
            tracing::warn!("requests still open {} s after the shutdown signal; closing them", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    };
    tracing::info!("HTTP server stopped; flushing the log and the processor");

    // Order matters: no handler can queue a batch any more, so the writer commits what is queued
    // and exits; then the processor finishes its step.
    stop_writer(writer).await;
    if let Some(stale) = stale {
        drop(stale.stop);
        let _ = tokio::task::spawn_blocking(move || stale.thread.join()).await;
    }
    processor.stop.stop();
    let thread = processor.thread;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    tracing::info!("stopped");
    served.map_err(Error::Serve)
}

async fn stop_writer(writer: log::LogWriter) {
    writer.handle.stop().await;
    let thread = writer.thread;
    // A panicked writer has already answered nothing more; there is nothing left to flush.
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
}

/// Whether a background thread (log writer, processor) is running, for `/healthz`. The flag
/// drops to false when the thread ends, also by a panic.
#[derive(Debug, Clone, Default)]
pub struct Liveness(Arc<AtomicBool>);

impl Liveness {
    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Marks the thread alive until the guard is dropped.
    pub(crate) fn guard(&self) -> AliveGuard {
        self.0.store(true, Ordering::Release);
        AliveGuard(self.0.clone())
    }
}

pub(crate) struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Wall-clock Unix time in ms (when a block was received).
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
