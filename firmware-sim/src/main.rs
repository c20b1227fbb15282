use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tributary_sim::cli::{self, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    tributary_sim::load::install_crypto_provider();
    match cli::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tributary-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}
