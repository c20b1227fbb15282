//! The `tributary-sim` command line: one subcommand per job.

use clap::{Parser, Subcommand};

use crate::load::{self, LoadArgs};
use crate::mqtt::{self, MqttArgs};
use crate::serial::{self, SerialArgs};
use crate::shutdown::Shutdown;

#[derive(Debug, Parser)]
#[command(name = "tributary-sim", version, about = "Simulated sensor firmware and load generator for Tributary")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Play simulated devices over MQTT; prints the totals when done or stopped.
    Mqtt(MqttArgs),
    /// POST pre-encoded ingest batches to the aggregator and measure its rate.
    Load(LoadArgs),
    /// Play simulated devices over a serial port (frames or lines), with injected faults;
    /// prints what was sent when done or stopped.
    Serial(SerialArgs),
}

/// Runs a command and prints its one-line result to stdout (logs go to stderr).
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Mqtt(args) => {
            let report = mqtt::run(&args, Shutdown::on_signals()).await?;
            println!("{report}");
            if report.undelivered > 0 {
                anyhow::bail!("{} messages were published but not confirmed by the broker", report.undelivered);
            }
        }
        Command::Load(args) => println!("{}", load::run(&args).await?),
        Command::Serial(args) => println!("{}", serial::run(&args, Shutdown::on_signals()).await?),
    }
    Ok(())
}
