//! What the pre-filters cost on the intake's hot path: MQTT payloads decoded and validated
//! ([`Decoder`]), run through [`Filters`] and appended to a block, as `Intake::take` does, without
//! the spool or the broker. Prints readings/s without filters, with a `sensor = "**"` deadband that
//! passes nearly every reading, and with one that drops nearly every reading.
//!
//!     cargo run --release -p tributary-agent --example filter_bench [readings=2000000] [sensors=1000]

use std::time::Instant;

use tributary_agent::decode::Decoder;
use tributary_agent::filter::{FilterConfig, FilterCounters, Filters};
use tributary_agent::metrics::Metrics;
use tributary_shared::BlockBuilder;

fn filters(toml: &str, metrics: &Metrics) -> Filters {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        filter: Vec<FilterConfig>,
    }
    let file: File = tributary_shared::config_file::parse(toml, std::path::Path::new("bench.toml")).expect("config");
    Filters::new(&file.filter, FilterCounters::new(metrics))
}

/// Readings/s of decode + filters + block append over `messages`; the block is emptied every
/// 10,000 readings, as the spool's blocks are.
fn run(messages: &[(String, Vec<u8>)], filters: &mut Filters) -> (f64, usize) {
    let mut decoder = Decoder::new(&["sensors/#".to_string()], 256 * 1024, 300_000);
    let mut block = BlockBuilder::default();
    let mut kept = 0;
    let now = 1_764_000_000_000 + 10_000_000;
    let started = Instant::now();
    for (topic, payload) in messages {
        let mut push = |sensor: &str, ts: i64, value: f64| {
            let index = block.intern(sensor);
            block.push_interned(index, ts, value);
        };
        decoder.decode(
            topic.as_bytes(),
            payload,
            now,
            // Without filters, `apply` hands each reading straight to `push`.
            |sensor, ts, value| filters.apply(sensor, ts, value, now, &mut push),
            |_| {},
        );
        if block.len() >= 10_000 {
            kept += block.len();
            block.take();
        }
    }
    kept += block.len();
    (messages.len() as f64 / started.elapsed().as_secs_f64(), kept)
}

/// Nanoseconds per reading of the filters alone (lookup, deadband, emit) over `sensors` sensors.
fn filters_alone(filters: &mut Filters, n: usize, sensors: usize) -> f64 {
    let ids: Vec<String> = (0..sensors).map(|i| format!("s{i}")).collect();
    let mut kept = 0usize;
    let started = Instant::now();
    for i in 0..n {
        let value = (i / sensors) as f64;
        filters.apply(&ids[i % sensors], 1_764_000_000_000 + i as i64, value, 0, &mut |_, _, _| kept += 1);
    }
    std::hint::black_box(kept);
    started.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("a number"));
    let n = args.next().unwrap_or(2_000_000);
    let sensors = args.next().unwrap_or(1_000);
    // The pipeline bench's payloads, spread over `sensors` topics; `changing` values step by 1.
    let make = |changing: bool| -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let value = if changing { (i / sensors) as f64 } else { 21.5 };
                let payload =
                    format!("{{\"seq\": {i}, \"value\": {value:?}, \"ts\": {}}}", 1_764_000_000_000 + i as i64);
                (format!("sensors/s{}", i % sensors), payload.into_bytes())
            })
            .collect()
    };
    let changing = make(true);
    let steady = make(false);
    let metrics = Metrics::new();
    let deadband = "[[filter]]\nsensor = \"**\"\ndeadband = { delta = 0.5, max_silence = \"1h\" }\n";
    for round in 0..3 {
        let (off, kept_off) = run(&changing, &mut filters("", &metrics));
        let (pass, kept_pass) = run(&changing, &mut filters(deadband, &metrics));
        let (drop, kept_drop) = run(&steady, &mut filters(deadband, &metrics));
        println!(
            "round {round}: no filters {:.2} M readings/s ({kept_off} kept); deadband passing {:.2} M/s ({kept_pass} kept, {:.2}x); \
             deadband dropping {:.2} M/s ({kept_drop} kept, {:.2}x)",
            off / 1e6,
            pass / 1e6,
            pass / off,
            drop / 1e6,
            drop / off
        );
    }
    let alone = filters_alone(&mut filters(deadband, &metrics), n, sensors);
    println!("the deadband filter alone: {alone:.0} ns a reading ({sensors} sensors)");
}
