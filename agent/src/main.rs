use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tributary_agent::config::{Config, EXAMPLE};
use tributary_agent::spool;

/// Tributary gateway agent: reads sensors over MQTT, spools readings in SQLite, forwards them in
/// batches to the aggregator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). `generate-config` prints a commented example.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Check a configuration file and say what it sets up, without starting anything: exit 0 if
    /// the agent can use it, else 1 with the key and the reason.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the commented example configuration with every default.
    GenerateConfig,
    /// Inspect or repair the spool in the configured data_dir.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Blocks the aggregator refused for good (400 invalid_block), kept in the spool's dead_letters table.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// What the spool holds: pending blocks and readings, their sequence range, bytes, dead
    /// letters. Reads only; the agent may be running.
    Stats,
    /// SQLite's integrity check and every pending block decoded against its count. Exits non-zero
    /// naming each damaged block. Reads only; the agent may be running.
    Check,
    /// Move the spool aside and write a fresh one with every block that can still be read, under
    /// the same epoch and sequence numbers (the agent does this by itself at start when the file
    /// is damaged). The agent must be stopped.
    Salvage,
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Print each dead letter: first_seq, count, time (UTC), reason. Reads only; the agent may be running.
    List,
    /// Move dead letters back into the spool, to be sent again under their own sequence numbers
    /// when the agent starts (the aggregator fills holes below its mark). The agent must be
    /// stopped: this takes the spool's lock and refuses while the agent holds it.
    Retry {
        /// Only the dead letter starting at this sequence number (default: all of them).
        #[arg(long)]
        first_seq: Option<u64>,
    },
}

fn main() {
    // A user-facing error: the message with its causes, no backtrace.
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::GenerateConfig) = cli.command {
        print!("{EXAMPLE}");
        return Ok(());
    }
    if let Some(path) = cli.check_config {
        let config = Config::load(&path)?;
        println!("{}: ok", path.display());
        println!("  agent {} forwards to {}", config.agent_id, config.upstream.url);
        match config.mqtt.mode {
            tributary_agent::config::MqttMode::Embedded => println!(
                "  MQTT: embedded broker on {}, topics {:?}, {}",
                config.mqtt.listen,
                config.mqtt.topics,
                match config.mqtt.users.len() {
                    0 => "any client may connect".to_string(),
                    n => format!("{n} user(s) may connect"),
                }
            ),
            tributary_agent::config::MqttMode::Client => println!(
                "  MQTT: client of {}, topics {:?}{}",
                config.mqtt.url.as_ref().map_or_else(|| "-".to_string(), |u| u.to_string()),
                config.mqtt.topics,
                config.mqtt.username.as_ref().map_or_else(String::new, |u| format!(", as user {u:?}"))
            ),
        }
        println!("  serial ports: {}, filter tables: {}", config.serial.len(), config.filter.len());
        println!("  spool in {} (at most {} bytes)", config.data_dir.display(), config.spool.max_bytes);
        println!("  /healthz and /metrics on {}", config.http.listen);
        return Ok(());
    }
    let path = cli.config.context("--config <file> is required (see `tributary-agent generate-config`)")?;
    let config = Config::load(&path)?;
    match cli.command {
        Some(Command::Spool { command: SpoolCommand::DeadLetters(command) }) => return dead_letters(&config, command),
        Some(Command::Spool { command: SpoolCommand::Stats }) => return spool_stats(&config),
        Some(Command::Spool { command: SpoolCommand::Check }) => return spool_check(&config),
        Some(Command::Spool { command: SpoolCommand::Salvage }) => {
            let s = tributary_agent::salvage::salvage(&config.data_dir)?;
            println!(
                "salvaged {} block(s), {} reading(s), into a fresh spool (epoch {}); lost {} block(s), {} reading(s){}; \
                 the old file is {}",
                s.blocks,
                s.readings,
                s.epoch.map_or_else(|| "new: the old one was unreadable".to_string(), |e| e.to_string()),
                s.lost_blocks,
                s.lost_readings,
                s.unreadable.map(|u| format!(", and the rest was unreadable ({u})")).unwrap_or_default(),
                s.damaged.display()
            );
            return Ok(());
        }
        Some(Command::GenerateConfig) | None => {}
    }

    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // rumqttd logs every client disconnect as an error, and its router opens a span per
                // publish (a third of its CPU time); the agent counts what matters in its metrics.
                .unwrap_or_else(|_| {
                    "info,rumqttd=warn,rumqttd::server::broker=off,rumqttd::router::routing=off".into()
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    // reqwest is built without a default TLS provider (aws-lc-rs does not cross-compile well for
    // ARM gateways); ring it is.
    let _ = rustls::crypto::ring::default_provider().install_default();

    limit_malloc_arenas();
    // The embedded broker takes up to 10,000 device connections; systemd's soft limit of 1,024
    // open files would stop it accepting at about a thousand.
    if let Some(open_files) = tributary_shared::process::raise_open_files().filter(|n| *n < 4_096) {
        tracing::warn!(
            open_files,
            "the open-file limit is low for many MQTT clients: raise it (LimitNOFILE=, ulimit -n)"
        );
    }
    // Two workers carry every connection, the intake and the forwarder (the router and the spool
    // writer have their own threads); a blocking pool of a few threads is enough for the short
    // spool reads and the broker's link set-up, where tokio's default (up to 512) would start a
    // thread, a stack and a malloc arena for each of a thousand sensors connecting at once.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(4);
        // Installed before anything runs: a SIGHUP never kills the agent.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        // A file that does not load goes too: the agent counts and logs the refusal.
                        let loaded = Config::load(&path).map_err(|e| format!("{:#}", anyhow::Error::new(e)));
                        if reload_tx.send(loaded).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Err(error) => tracing::error!(%error, "cannot listen for SIGHUP; configuration changes need a restart"),
        }
        tributary_agent::run_with_reload(config, shutdown_signal(), Some(reload_rx)).await
    })?;
    Ok(())
}

fn dead_letters(config: &Config, command: DeadLetterCommand) -> anyhow::Result<()> {
    match command {
        DeadLetterCommand::List => {
            let letters = spool::list_dead_letters(&config.data_dir)?;
            if letters.is_empty() {
                println!("no dead letters in {}", config.data_dir.display());
                return Ok(());
            }
            println!("{:>20} {:>8}  {:<20}  reason", "first_seq", "count", "time (UTC)");
            for d in &letters {
                println!("{:>20} {:>8}  {:<20}  {}", d.first_seq, d.count, utc(d.at_ms), d.reason);
            }
        }
        DeadLetterCommand::Retry { first_seq } => {
            let (blocks, readings) = spool::retry_dead_letters(&config.data_dir, first_seq)?;
            println!(
                "moved {blocks} dead-lettered block(s), {readings} reading(s), back into the spool; \
                 they are sent when the agent starts"
            );
        }
    }
    Ok(())
}

fn spool_stats(config: &Config) -> anyhow::Result<()> {
    let s = spool::stats(&config.data_dir)?;
    let range = match (s.first_seq, s.end_seq) {
        (Some(first), Some(end)) => format!("{first}..{end}"),
        _ => "-".into(),
    };
    println!("pending blocks:    {}", s.blocks);
    println!("pending readings:  {}", s.readings);
    println!("sequence range:    {range}");
    println!("block data bytes:  {}", s.data_bytes);
    println!("file bytes:        {} (spool.db and its WAL)", s.file_bytes);
    if s.readings > 0 {
        println!("bytes per reading: {:.1} (block data)", s.data_bytes as f64 / s.readings as f64);
    }
    println!("dead letters:      {}", s.dead_letters);
    Ok(())
}

fn spool_check(config: &Config) -> anyhow::Result<()> {
    let problems = spool::check(&config.data_dir)?;
    if problems.is_empty() {
        println!("spool ok: {}", config.data_dir.join(spool::SPOOL_FILE).display());
        return Ok(());
    }
    for p in &problems {
        println!("{p}");
    }
    anyhow::bail!(
        "the spool has {} problem(s); stop the agent and move spool.db and spool.db-wal aside to start a fresh spool (the damaged blocks cannot be sent)",
        problems.len()
    )
}

/// Unix ms as `2026-01-31T12:00:00Z` (days to civil date: Howard Hinnant's algorithm).
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Threads of tokio's blocking pool.
const BLOCKING_THREADS: usize = 4;
/// glibc's malloc arenas when `MALLOC_ARENA_MAX` does not say (see [`limit_malloc_arenas`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MALLOC_ARENAS: libc::c_int = 1;

/// glibc gives each thread that allocates its own malloc arena (up to 8 per core), and each keeps
/// the memory it freed for itself: under load that was 5 MiB of the agent's RSS. One arena is
/// shared by the few threads that allocate (tokio's workers, the router, the spool writer) at no
/// measurable cost in CPU. `MALLOC_ARENA_MAX` in the environment (glibc's own knob) overrides it.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; called before the agent starts threads.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
}

/// `pow` is the only function of libm.so the agent calls (tokio's scheduler, in its moving average
/// of task poll times): defined here from the `libm` crate (musl's), the linker resolves it in the
/// binary and drops libm.so, whose pages mapped at start (its IFUNC resolvers and fault-around
/// neighbours) were 0.5 MiB of a 10 MiB RSS. Its results are glibc's or one ulp from them (checked
/// on tokio's arguments and 1.8 M random ones), which a moving average does not notice.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    #[test]
    fn times_print_as_utc() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(1_764_000_000_000), "2025-11-24T16:00:00Z");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
