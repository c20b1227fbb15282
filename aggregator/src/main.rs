//! `tributary-aggregator --config aggregator.toml` runs the service;
//! `tributary-aggregator generate-config` prints the commented default configuration.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tributary_aggregator::Config;

#[derive(Parser)]
#[command(version, about = "Tributary's central service: ingest, immutable log, stream processing, dashboard API")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// The configuration file (TOML); see `generate-config`.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the commented default configuration.
    GenerateConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::GenerateConfig) = cli.command {
        print!("{}", tributary_aggregator::config::EXAMPLE_CONFIG);
        return ExitCode::SUCCESS;
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
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        // The library's errors spell out their causes in their own message; `{:#}` would repeat them.
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("aggregator")
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(tributary_aggregator::run(config, shutdown_signal()))?;
    Ok(())
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
