//! Tributary's simulated sensor firmware and ingest load generator.
//!
//! The device core is what would run on a sensor node: `no_std`, no allocation, only `core`,
//! `heapless` and `libm`, deterministic given a seed.
//! - [`signal`]: signal models (daily cycle, drift, noise, spikes) for temperature, humidity, pressure.
//! - [`device`]: a simulated node holding its signals, PRNG and payload buffer in fixed-size memory.
//! - [`payload`]: the MQTT payload formats the agent understands, written with `core::fmt`.
//!
//! The default `host` feature adds what needs an operating system; the `tributary-sim` binary is a
//! thin `main` over these:
//! - [`cli`]: the command line.
//! - [`mqtt`]: plays many devices over one (or a few) MQTT connections.
//! - [`load`]: pre-encodes ingest batches and POSTs them to the aggregator as fast as it acks.
//! - [`shutdown`]: Ctrl-C / SIGTERM handling.
#![cfg_attr(not(feature = "host"), no_std)]

pub mod device;
pub mod payload;
pub mod signal;

#[cfg(feature = "host")]
pub mod cli;
#[cfg(feature = "host")]
pub mod load;
#[cfg(feature = "host")]
pub mod mqtt;
#[cfg(feature = "host")]
pub mod shutdown;

pub use device::{Device, Sample};
pub use payload::Format;
pub use signal::Quantity;
