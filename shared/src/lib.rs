//! The data model and wire formats that Tributary's agent and aggregator both speak.
//!
//! - [`reading`]: one sensor reading and the rules a valid one follows.
//! - [`block`]: a run of consecutive readings of one agent, encoded compactly (sensor ids interned,
//!   timestamps as deltas, optionally zstd-compressed). The spool, the wire and the log all store blocks.
//! - [`batch`]: what an agent POSTs to the aggregator (postcard by default, JSON accepted) and the ack.
//! - [`gap`]: what an agent reports about readings it dropped.
//! - [`frame`]: the serial frame format (postcard + CRC-32 + COBS) sensors send over a UART.
//!
//! - [`config_file`] (feature `config`): TOML configuration files whose errors name the file, the
//!   key and the reason.
//!
//! Without the default `std` feature the crate is `no_std` + `alloc`, so firmware can share the model.
#![cfg_attr(not(feature = "std"), no_std)]

extern crate alloc;

pub mod batch;
pub mod block;
#[cfg(feature = "config")]
pub mod config_file;
pub mod frame;
pub mod gap;
#[cfg(feature = "tls")]
pub mod pem;
#[cfg(feature = "process")]
pub mod process;
pub mod reading;

pub use batch::{Batch, IngestAck, JsonBatch, JsonBlock, WireBlock};
#[cfg(feature = "std")]
pub use block::BlockDecoder;
pub use block::{Block, BlockBuilder, BlockClock, BlockError, BlockView, Entry};
pub use gap::{GapReport, GapReports};
pub use reading::{MAX_SENSOR_ID_LEN, MAX_TS_MS, MIN_TS_MS, Reading, ReadingError};
