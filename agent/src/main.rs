use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tributary_agent::config::{Config, EXAMPLE};

/// Tributary gateway agent: reads sensors over MQTT, spools readings in SQLite, forwards them in
/// batches to the aggregator.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (TOML). `generate-config` prints a commented example.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the commented example configuration with every default.
    GenerateConfig,
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
    let path = cli.config.context("--config <file> is required (see `tributary-agent generate-config`)")?;
    let config = Config::load(&path)?;

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

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(tributary_agent::run(config, shutdown_signal()))?;
    Ok(())
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
