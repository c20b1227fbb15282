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
//! [`inspect`] (`log inspect|tail|stats`), [`backup`] (`backup`/`restore`) and [`import`] are the command-line
//! tools over a data directory; [`lock`] keeps one process at a time on it.

pub mod access;
pub mod allocator;
pub mod api;
pub mod backup;
pub mod config;
pub mod dashboard;
pub mod fleet;
pub mod import;
pub mod influx;
pub mod ingest;
pub mod inspect;
pub mod json;
pub mod live;
pub mod lock;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod parquet;
pub mod pipeline;
pub mod prometheus;
pub mod retention;
pub mod series;
pub mod stale;
pub mod store;
pub mod tls;
pub mod versions;

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
    Tls(#[from] tls::TlsConfigError),
    #[error(transparent)]
    Locked(#[from] lock::LockError),
    #[error(transparent)]
    Version(#[from] versions::VersionError),
    #[error(
        "{} is damaged ({report}). The log is the only copy of the readings, so it is not rebuilt: restore the \
         last backup with `tributary-aggregator restore --config FILE --from DIR --force` (agents then resend what \
         they still spool), or move the file away to start with an empty log",
        path.display()
    )]
    DamagedLog { path: PathBuf, report: String },
    #[error("the recorded settings of pipeline version {version} in pipeline.json do not load: {detail}")]
    Settings { version: u32, detail: String },
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
    serve_with_reload(config, listener, shutdown, None).await
}

/// [`run`] that also takes configurations read again while it runs (SIGHUP): a raised
/// `[pipeline] version` starts its replay without a restart; other changes wait for one.
pub async fn run_with_reload(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), Error> {
    let addr = config.http.listen;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
    serve_with_reload(config, listener, shutdown, Some(reload)).await
}

/// [`serve`] with [`run_with_reload`]'s reloads.
pub async fn serve_with_reload(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<tokio::sync::mpsc::Receiver<Config>>,
) -> Result<(), Error> {
    // Before anything opens: a certificate that went missing since the configuration was read stops
    // the start, not the first client.
    let tls = tls::server_config(&config.http)?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| Error::DataDir { path: data_dir.clone(), source })?;
    // Held until this function returns: no second aggregator, no restore underneath this one.
    let _lock = lock::DataDirLock::acquire(&data_dir)?;
    let log_path = data_dir.join("log.db");
    // A torn tail (a crash mid-append) is SQLite's to recover: a WAL frame without its checksum
    // is not part of the file. Damage beyond that is found here, before anything writes.
    if log_path.exists() {
        store::check_file(&log_path, "quick_check")
            .map_err(|report| Error::DamagedLog { path: log_path.clone(), report })?;
    }
    let now = unix_ms();
    let (mut registry, plan) = versions::plan(
        &data_dir,
        config.pipeline.version,
        &config.pipeline_fingerprint(),
        &config.pipeline_settings(),
        now,
    )?;
    versions::drop_expired(&data_dir, &mut registry, config.pipeline.keep_previous, now);
    versions::save(&data_dir, &registry)?;
    let (serving_version, replay_version) = match plan {
        versions::Plan::Serve(v) => (v, None),
        versions::Plan::Replay { serving, new } => (serving, Some(new)),
    };
    // The serving version goes on with the settings it was computed with while a new one replays.
    let serving_config = match registry.get(serving_version).and_then(|r| r.settings.as_ref()) {
        Some(settings) if serving_version != config.pipeline.version => config
            .with_pipeline_settings(settings)
            .map_err(|detail| Error::Settings { version: serving_version, detail })?,
        _ => config.clone(),
    };
    let store_path = versions::store_path(&data_dir, serving_version);
    // Stores can be rebuilt from the log: a damaged one is set aside and replayed.
    for path in [Some(store_path.clone()), replay_version.map(|v| versions::store_path(&data_dir, v))]
        .into_iter()
        .flatten()
        .chain([data_dir.join("stale.db")])
    {
        // One a replay was building without fsync when the machine went down is deleted (and
        // replayed), whatever a check would say of it.
        store::recover_unsynced(&path).map_err(pipeline::processor::ProcessError::from)?;
        if !path.exists() {
            continue;
        }
        if let Err(report) = store::check_file(&path, "quick_check") {
            set_aside_damaged(&path, &report, now);
        }
    }

    let metrics = Arc::new(metrics::Metrics::new());
    let writer_alive = Liveness::default();
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
    let live = live::Hub::new(config.http.max_stream_clients);
    let starter = versions::Starter {
        data_dir: data_dir.clone(),
        log_path: log_path.clone(),
        end: writer.end.clone(),
        metrics: metrics.clone(),
        log: writer.handle.clone(),
        notifier: notifier.clone(),
        live: live.clone(),
        runtime: tokio::runtime::Handle::current(),
    };
    let start_version = |version: u32, config: &Config, serving: bool| starter.start(version, config, serving);
    let started = start_version(serving_version, &serving_config, true).and_then(|serving| {
        let replay = match replay_version {
            Some(version) => {
                match start_version(version, &config, false) {
                    Ok(replay) => {
                        // from_offset > 0: a replay a restart interrupted, resumed where it stopped.
                        tracing::info!(
                            version,
                            serving = serving_version,
                            from_offset = replay.from,
                            "replaying the log into a new pipeline version; the API serves version \
                             {serving_version} until it has caught up"
                        );
                        Some(replay)
                    }
                    Err(error) => {
                        stop_processor(serving);
                        return Err(error);
                    }
                }
            }
            None => None,
        };
        Ok((serving, replay))
    });
    let (serving, replay) = match started {
        Ok(started) => started,
        Err(error) => {
            stop_writer(writer).await;
            return Err(error.into());
        }
    };

    let retention = match config.log.retain.as_deref().map(config::parse_retain) {
        Some(Ok(retain)) => match retention::start(&log_path, retain, metrics.clone()) {
            Ok(retention) => Some(retention),
            Err(error) => {
                tracing::error!(%error, "log retention is off");
                None
            }
        },
        _ => None,
    };
    let store = store::StoreReader::new(&store_path);
    let stale_path = data_dir.join("stale.db");
    // The checker reads the store the processor has just created.
    let stale = match stale::start(config.stale_rules(), store.clone(), &stale_path, notifier) {
        Ok(stale) => stale,
        Err(error) => {
            tracing::error!(%error, "stale-sensor alerts are off");
            None
        }
    };
    let versions = Arc::new(versions::Versions::new(&data_dir, registry, serving.layout.clone(), writer.end.clone()));
    let (supervisor_stop, supervisor_stopped) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(versions::supervise(
        versions::Supervised { versions: versions.clone(), store: store.clone(), starter, reload },
        serving,
        replay,
        config.pipeline.keep_previous,
        supervisor_stopped,
    ));
    let tls_failures = metrics.tls_handshake_failures.clone();
    let state = api::AppState {
        agents: config.agents.clone().into(),
        log: writer.handle.clone(),
        store,
        stale: stale.is_some().then(|| store::StoreReader::new(&stale_path)),
        metrics,
        writer_alive,
        versions,
        access: Arc::new(access::Access { read_token: config.http.read_token.clone() }),
        cors_origins: config.http.cors_origins.clone().into(),
        live,
        fleet: Arc::new(fleet::Fleet::default()),
        log_path: log_path.clone(),
    };
    let local = listener.local_addr().map_err(Error::Serve)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client_certificates = if config.http.tls_client_ca.is_some() { "required" } else { "none" };
    tracing::info!(
        data_dir = %data_dir.display(),
        agents = config.agents.len(),
        client_certificates,
        "listening on {scheme}://{local}"
    );
    // Graceful shutdown waits for open requests; a client that never finishes its request must
    // not keep the process alive, so the wait is bounded.
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    };
    let router = api::router(state);
    // The same axum server either way; with TLS its connections come handshaken (see `tls`).
    let server: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match tls {
        None => Box::pin(axum::serve(listener, router).with_graceful_shutdown(shutdown).into_future()),
        Some(tls) => {
            let listener = tls::TlsListener::new(listener, local, tls, tls_failures);
            Box::pin(axum::serve(listener, router).with_graceful_shutdown(shutdown).into_future())
        }
    };
    let grace_over = async {
        match signalled_rx.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    let served = tokio::select! {
        served = server => served,
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
    if let Some(retention) = retention {
        drop(retention.stop);
        let _ = tokio::task::spawn_blocking(move || retention.thread.join()).await;
    }
    let _ = supervisor_stop.send(true);
    if let Ok(running) = supervisor.await {
        for r in &running {
            r.thread.stop.stop();
        }
        let _ = tokio::task::spawn_blocking(move || running.into_iter().for_each(stop_processor)).await;
    }
    tracing::info!("stopped");
    served.map_err(Error::Serve)
}

/// Moves a damaged store (and its WAL) to `<name>.damaged-<ms>`, for a look later; the processor
/// then rebuilds it from the log.
fn set_aside_damaged(path: &std::path::Path, report: &str, now: i64) {
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = path.with_file_name(format!("{file}.damaged-{now}"));
    for suffix in ["", "-wal", "-shm", "-unsynced"] {
        let from = path.with_file_name(format!("{file}{suffix}"));
        if from.exists() {
            if let Err(error) = std::fs::rename(&from, aside.with_file_name(format!("{file}.damaged-{now}{suffix}"))) {
                tracing::error!(%error, path = %from.display(), "cannot move a damaged file aside");
            }
        }
    }
    tracing::error!(
        path = %path.display(),
        report,
        moved_to = %aside.display(),
        "damaged serving store set aside; rebuilding it from the log (the API serves less until it has caught up)"
    );
}

/// Stops a processor and waits for its last commit (a blocking join).
fn stop_processor(running: versions::Running) {
    running.thread.stop.stop();
    let _ = running.thread.thread.join();
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
