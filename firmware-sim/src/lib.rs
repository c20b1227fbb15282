//! Tributary's simulated sensor firmware and ingest load generator.
//!
//! The device core is what would run on a sensor node: `no_std`, no allocation, only `core`,
//! `heapless`, `libm` and the frame codec of `tributary-shared`, deterministic given a seed.
//! - [`signal`]: signal models (daily cycle, drift, noise, spikes) for temperature, humidity, pressure.
//! - [`device`]: a simulated node holding its signals, PRNG and payload buffer in fixed-size memory.
//! - [`payload`]: the MQTT payload formats the agent understands, written with `core::fmt`.
//! - [`uart`]: what a device writes to a serial port (frames or lines) and its fixed-size outbox.
//!
//! The default `host` feature adds what needs an operating system; the `tributary-sim` binary is a
//! thin `main` over these:
//! - [`cli`]: the command line.
//! - [`mqtt`]: plays many devices over one (or a few) MQTT connections.
//! - [`serial`]: plays devices over a serial port, with injected faults, recording what it sent.
//! - [`load`]: pre-encodes ingest batches and POSTs them to the aggregator as fast as it acks.
//! - [`shutdown`]: Ctrl-C / SIGTERM handling.
#![cfg_attr(not(feature = "host"), no_std)]

pub mod device;
pub mod payload;
pub mod signal;
pub mod uart;

#[cfg(feature = "host")]
pub mod cli;
#[cfg(feature = "host")]
pub mod load;
#[cfg(feature = "host")]
pub mod mqtt;
#[cfg(feature = "host")]
pub mod serial;
#[cfg(feature = "host")]
pub mod shutdown;

pub use device::{Device, Sample};
pub use payload::Format;
pub use signal::Quantity;
