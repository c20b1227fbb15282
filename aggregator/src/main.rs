//! `tributary-aggregator --config aggregator.toml` runs the service;
//! `tributary-aggregator generate-config` prints the commented default configuration;
//! `log inspect|tail|stats` read the log, `backup` and `restore` copy the data directory.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tributary_aggregator::inspect::{self, Filter, Format, InspectError};
use tributary_aggregator::{Config, backup, import, lock, versions};

#[derive(Parser)]
#[command(version, about = "Tributary's central service: ingest, immutable log, stream processing, dashboard API")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// The configuration file (TOML); see `generate-config`.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check a configuration file without starting anything: exit 0 if the aggregator can use it,
    /// else 1 with the file, the key and the reason.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the commented default configuration.
    GenerateConfig,
    /// Read the log (read-only; safe while the aggregator runs).
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Copy the databases of data_dir into DIR, consistently, while the aggregator runs.
    Backup {
        /// The aggregator's configuration file (its data_dir is copied).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Where to write the backup (created if missing; must be empty unless --force).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Write into a non-empty DIR, replacing a backup there.
        #[arg(long)]
        force: bool,
    },
    /// Pipeline versions: see which serves, or go back to the previous one.
    Pipeline {
        #[command(subcommand)]
        command: PipelineCommand,
    },
    /// Append a history (CSV `sensor,ts,value` or JSON Lines) to the log as agent ID; importing the
    /// same file again appends nothing. The aggregator must be stopped; it processes the history
    /// when it starts.
    Import {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The agent id the readings are logged under.
        #[arg(long, value_name = "ID")]
        agent: String,
        /// `csv` or `jsonl`; by default from the file name (.jsonl, .ndjson, .json: JSON Lines).
        #[arg(long, value_name = "FORMAT")]
        format: Option<String>,
        /// The file to import.
        file: PathBuf,
    },
    /// Reprocess the log offline into a pipeline version's store (the aggregator must be stopped):
    /// a raised [pipeline] version is computed ahead, so that the next start switches to it as
    /// soon as it has caught up with what arrived since.
    Replay {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// The version to compute with the file's settings. Default: the file's [pipeline] version.
        #[arg(long, value_name = "N")]
        version: Option<u32>,
        /// Start a version that has processed nothing yet at this offset (what is before is left out).
        #[arg(long, value_name = "N")]
        from_offset: Option<u64>,
        /// Stop at the first block boundary at or after this offset. Default: the log's end.
        #[arg(long, value_name = "N")]
        until_offset: Option<u64>,
    },
    /// Put a backup into data_dir (the aggregator must be stopped).
    Restore {
        /// The aggregator's configuration file (the backup goes into its data_dir).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// A directory written by `backup`.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Replace the databases of a non-empty data_dir.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PipelineCommand {
    /// Print pipeline.json: which version serves, and every version's state.
    Status {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Serve the previous version again (its tables are kept for [pipeline] keep_previous after
    /// a switch). The aggregator must be stopped; start it again with that version's settings.
    Rollback {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Print readings from the log with their offsets, oldest first.
    Inspect {
        #[command(flatten)]
        filter: FilterArgs,
        /// Print at most N readings; 0 prints all.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u64,
    },
    /// Print the last readings of the log, and with --follow the new ones as they arrive.
    Tail {
        #[command(flatten)]
        filter: FilterArgs,
        /// How many of the last matching readings to print first.
        #[arg(long, short = 'n', value_name = "N", default_value_t = 10)]
        lines: u64,
        /// Keep printing readings as they are appended, until Ctrl-C or SIGTERM.
        #[arg(long, short)]
        follow: bool,
    },
    /// Print the log's offsets, size, agents and time span (without decoding its blocks).
    Stats {
        /// The aggregator's configuration file (its data_dir holds the log).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
}

#[derive(clap::Args)]
struct FilterArgs {
    /// The aggregator's configuration file (its data_dir holds the log).
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Only sensors matching this glob (`*` stays within one `/` level, `**` crosses them).
    #[arg(long, value_name = "GLOB")]
    sensor: Option<String>,
    /// Only readings from this agent id.
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    /// Start at this offset.
    #[arg(long, value_name = "N", default_value_t = 0)]
    from_offset: u64,
    /// Stop before this offset (exclusive).
    #[arg(long, value_name = "M")]
    until_offset: Option<u64>,
    /// Only readings received since TIME: RFC 3339 (2026-01-31T12:00:00Z) or a duration back from now (10m, 2h).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Text)]
    format: FormatArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    /// One line of key=value fields per reading.
    Text,
    /// One JSON object per line.
    Jsonl,
}

impl FilterArgs {
    /// The data directory and the filter, or a message for the user.
    fn resolve(&self) -> Result<(PathBuf, Filter, Format), String> {
        let config = load_config(&self.config)?;
        let sensor = self.sensor.as_deref().map(tributary_aggregator::config::parse_glob).transpose()?;
        let since_ms = self.since.as_deref().map(|s| inspect::parse_since(s, now_ms())).transpose()?;
        let filter = Filter {
            sensor,
            agent: self.agent.clone(),
            from_offset: self.from_offset,
            until_offset: self.until_offset,
            since_ms,
        };
        let format = match self.format {
            FormatArg::Text => Format::Text,
            FormatArg::Jsonl => Format::Jsonl,
        };
        Ok((config.data_dir, filter, format))
    }
}

fn load_config(path: &std::path::Path) -> Result<Config, String> {
    // `{:#}` adds the cause, e.g. why the file cannot be read.
    Config::load(path).map_err(|error| format!("{:#}", anyhow::Error::new(error)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Runs a `log` subcommand; a closed output pipe (`| head`) ends it quietly.
fn run_log(command: LogCommand) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = match command {
        LogCommand::Inspect { filter, limit } => filter
            .resolve()
            .and_then(|(dir, f, format)| inspect::inspect(&dir, &f, limit, format, &mut out).map_err(log_error)),
        LogCommand::Tail { filter, lines, follow } => filter
            .resolve()
            .and_then(|(dir, f, format)| inspect::tail(&dir, &f, lines, follow, format, &mut out).map_err(log_error)),
        LogCommand::Stats { config } => {
            load_config(&config).and_then(|c| inspect::stats(&c.data_dir, &mut out).map_err(log_error))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) if message.is_empty() => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `replay`: records the version as `pipeline plan` would at start, then folds the log into its
/// store with a progress bar on a terminal and a line every 5 s otherwise.
fn replay(config: &Config, from: Option<u64>, until: Option<u64>) -> Result<String, String> {
    use tributary_aggregator::pipeline::processor;
    let data_dir = &config.data_dir;
    if !data_dir.join("log.db").is_file() {
        return Err(format!("no log in {}: nothing to replay", data_dir.display()));
    }
    let _lock = lock::DataDirLock::acquire(data_dir).map_err(|e| e.to_string())?;
    let version = config.pipeline.version;
    let (registry, plan) =
        versions::plan(data_dir, version, &config.pipeline_fingerprint(), &config.pipeline_settings(), now_ms())
            .map_err(|e| e.to_string())?;
    versions::save(data_dir, &registry).map_err(|e| e.to_string())?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} replaying version {msg} [{bar:40}] {pos}/{len} offsets, {per_sec}, {eta} left",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(version.to_string());
        bar
    });
    let started = std::time::Instant::now();
    let mut last_line = started;
    let mut progress = |offset: u64, head: u64| match &bar {
        Some(bar) => {
            bar.set_length(head);
            bar.set_position(offset);
        }
        None if last_line.elapsed() >= std::time::Duration::from_secs(5) => {
            last_line = std::time::Instant::now();
            eprintln!(
                "replaying version {version}: offset {offset} of {head}, {:.0} readings/s",
                offset as f64 / started.elapsed().as_secs_f64().max(1e-9)
            );
        }
        None => {}
    };
    let done = processor::catch_up_range(
        &data_dir.join("log.db"),
        &versions::store_path(data_dir, version),
        config.pipeline_spec(),
        versions::derived_epoch(version),
        from,
        until,
        &mut progress,
    )
    .map_err(|e| e.to_string())?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    let next = match plan {
        versions::Plan::Replay { serving, .. } => format!(
            "version {serving} still serves: start the aggregator with this configuration to switch once version {version} has caught up with what arrived since"
        ),
        versions::Plan::Serve(_) => format!("version {version} serves"),
    };
    Ok(format!(
        "replayed {} readings into version {version} in {secs:.2} s ({:.0} readings/s); {next}",
        done.folded,
        done.folded as f64 / secs.max(1e-9)
    ))
}

/// Prints the outcome of `backup`/`restore` and turns it into the exit code.
fn report(result: Result<String, String>) -> ExitCode {
    match result {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The message for an error, empty for a reader that went away.
fn log_error(error: InspectError) -> String {
    match error {
        InspectError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => String::new(),
        other => other.to_string(),
    }
}

/// jemalloc, in one arena that hands back pages freed for a quarter of a second. Under glibc's
/// allocator the heap in use stayed about 32 MB while the RSS grew from 70 to 130-150 MiB over
/// 40 M live readings: what a commit allocates for a moment and frees left holes that the
/// long-lived windows pinned (tests/bench/live.sh at a steady 1 M readings/s: 69 / 88 MiB peak
/// after 10 / 40 M readings, 62 MiB at rest after both, and less CPU per reading).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (`_RJEM_MALLOC_CONF` in the environment still wins).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:1,dirty_decay_ms:250,muzzy_decay_ms:0,background_thread:true\0";

fn main() -> ExitCode {
    fewer_malloc_arenas();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::GenerateConfig) => {
            print!("{}", tributary_aggregator::config::EXAMPLE_CONFIG);
            return ExitCode::SUCCESS;
        }
        Some(Command::Log { command }) => return run_log(command),
        Some(Command::Import { config, agent, format, file }) => {
            return report(load_config(&config).and_then(|c| {
                let format = match format.as_deref() {
                    None => import::Format::of(&file),
                    Some("csv") => import::Format::Csv,
                    Some("jsonl") => import::Format::Jsonl,
                    Some(other) => return Err(format!("--format {other:?}: use csv or jsonl")),
                };
                std::fs::create_dir_all(&c.data_dir).map_err(|e| format!("{}: {e}", c.data_dir.display()))?;
                let _lock = lock::DataDirLock::acquire(&c.data_dir).map_err(|e| e.to_string())?;
                let r = import::import(&c.data_dir, &agent, &file, format).map_err(|e| e.to_string())?;
                let mut text = format!(
                    "imported {}: {} lines, {} readings: {} appended, {} already in the log, {} lines rejected; \
                     agent {agent} epoch {}; {:.2} s ({:.0} readings/s)",
                    file.display(),
                    r.lines,
                    r.readings,
                    r.appended,
                    r.duplicates,
                    r.rejected,
                    r.epoch,
                    r.seconds,
                    r.readings as f64 / r.seconds.max(1e-9)
                );
                for rejection in &r.rejections {
                    text.push_str(&format!("\n  rejected {rejection}"));
                }
                if r.rejected > r.rejections.len() as u64 {
                    text.push_str(&format!("\n  ... and {} more", r.rejected - r.rejections.len() as u64));
                }
                Ok(text)
            }));
        }
        Some(Command::Replay { config, version, from_offset, until_offset }) => {
            return report(load_config(&config).and_then(|mut c| {
                if let Some(version) = version {
                    c.pipeline.version = version;
                }
                replay(&c, from_offset, until_offset)
            }));
        }
        Some(Command::Pipeline { command: PipelineCommand::Status { config } }) => {
            return report(load_config(&config).and_then(|c| {
                match versions::load(&c.data_dir).map_err(|e| e.to_string())? {
                    Some(registry) => serde_json::to_string_pretty(&registry).map_err(|e| e.to_string()),
                    None => Ok(format!("no pipeline.json in {} yet: version 1 serves", c.data_dir.display())),
                }
            }));
        }
        Some(Command::Pipeline { command: PipelineCommand::Rollback { config } }) => {
            return report(load_config(&config).and_then(|c| {
                let _lock = lock::DataDirLock::acquire(&c.data_dir).map_err(|e| e.to_string())?;
                let (from, to) = versions::rollback(&c.data_dir, now_ms()).map_err(|e| e.to_string())?;
                Ok(format!(
                    "version {to} serves again (version {from} is rolled back). Set [pipeline] version = {to} with its \
                     settings before starting the aggregator; it catches up with the log from where version {to} \
                     stopped."
                ))
            }));
        }
        Some(Command::Backup { config, to, force }) => {
            return report(load_config(&config).and_then(|c| {
                let m = backup::backup(&c.data_dir, &to, force).map_err(|e| e.to_string())?;
                Ok(format!(
                    "backed up {} ({} readings, offsets {}..{}) into {}",
                    m.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", "),
                    m.log_readings,
                    m.log_first_offset,
                    m.log_end_offset,
                    to.display()
                ))
            }));
        }
        Some(Command::Restore { config, from, force }) => {
            return report(load_config(&config).and_then(|c| {
                let m = backup::restore(&c.data_dir, &from, force).map_err(|e| e.to_string())?;
                Ok(format!(
                    "restored the backup of {} ({} readings, offsets {}..{}) into {}",
                    m.created_at,
                    m.log_readings,
                    m.log_first_offset,
                    m.log_end_offset,
                    c.data_dir.display()
                ))
            }));
        }
        None => {}
    }
    if let Some(path) = cli.check_config {
        return report(load_config(&path).map(|c| {
            format!(
                "{}: ok\n  data in {}\n  listens on {}{}\n  {} agent(s), pipeline version {}",
                path.display(),
                c.data_dir.display(),
                c.http.listen,
                if c.http.tls_cert.is_some() { " (HTTPS)" } else { "" },
                c.agents.len(),
                c.pipeline.version
            )
        }));
    }
    let Some(path) = cli.config else {
        eprintln!("error: --config FILE is required (or run `generate-config` to print an example)");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(error) => {
            // `{:#}` adds the cause, e.g. why the file cannot be read.
            eprintln!("error: {:#}", anyhow::Error::new(error));
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // reqwest (webhooks) is built without a default TLS provider, as in the agent: ring it is.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match serve(config, path) {
        Ok(()) => ExitCode::SUCCESS,
        // The library's errors spell out their causes in their own message; `{:#}` would repeat them.
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config, path: PathBuf) -> anyhow::Result<()> {
    raise_open_files(config.http.max_stream_clients);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("aggregator")
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        // Installed before the server listens: a SIGHUP from then on never kills the process.
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangup) => {
                tokio::spawn(reload_on_sighup(path, hangup, reload_tx));
            }
            Err(error) => tracing::error!(%error, "cannot listen for SIGHUP; configuration changes need a restart"),
        }
        #[cfg(not(unix))]
        let _ = (path, reload_tx);
        tributary_aggregator::run_with_reload(config, shutdown_signal(), reload_rx).await
    })?;
    Ok(())
}

/// Raises the soft limit on open files to the hard one (systemd gives services 1,024), and warns
/// when even that leaves too little room for `stream_clients` beside the agents' connections.
fn raise_open_files(stream_clients: usize) {
    let wanted = stream_clients as u64 + 1_024;
    if let Some(open_files) = tributary_shared::process::raise_open_files().filter(|n| *n < wanted) {
        tracing::warn!(
            open_files,
            wanted,
            "the open-file limit is low for [http] max_stream_clients plus agents: raise it \
             (LimitNOFILE= in the systemd unit, ulimit -n) or lower max_stream_clients"
        );
    }
}

/// Reads the configuration again on each SIGHUP and hands it over; a file that does not load
/// changes nothing.
#[cfg(unix)]
async fn reload_on_sighup(
    path: PathBuf,
    mut hangup: tokio::signal::unix::Signal,
    reload: tokio::sync::mpsc::Sender<Config>,
) {
    while hangup.recv().await.is_some() {
        match Config::load(&path) {
            Ok(config) => {
                if reload.send(config).await.is_err() {
                    return;
                }
            }
            Err(error) => tracing::error!("SIGHUP: {:#}; nothing changed", anyhow::Error::new(error)),
        }
    }
}

/// Completes on Ctrl-C or SIGTERM (what systemd sends).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        _ = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}

/// What is left on glibc's malloc (SQLite's pages and statements) uses two arenas, not 8 per
/// core: each thread's own arena kept pages that another thread's frees left behind (before
/// jemalloc, tests/bench/live.sh: peak RSS 321 instead of 507 MiB after 20 M readings).
/// `MALLOC_ARENA_MAX` in the environment still wins.
fn fewer_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
