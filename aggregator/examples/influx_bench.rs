//! Line-protocol write throughput: parse alone (one thread), then `POST /write` end to end into
//! an in-process aggregator (gzip bodies as Telegraf sends them, answered after the log commit).
//!
//! `cargo run --release -p tributary-aggregator --example influx_bench -- [lines] [lines per request] [writers]`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use tributary_aggregator::influx::{Precision, parse_write};
use tributary_aggregator::{AgentConfig, Config};

/// Numeric fields per line (Telegraf's `cpu` has 10; `mem` more; 5 is a middle).
const FIELDS: usize = 5;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let lines: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(400_000);
    let per_request: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5_000);
    let writers: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let per_writer = lines / writers;
    let bodies: Vec<Vec<String>> = (0..writers).map(|w| bodies(w, per_writer, per_request)).collect();
    let readings = (per_writer * writers * FIELDS) as f64;

    let cpu = cpu_us();
    let start = Instant::now();
    let mut parsed = 0u64;
    for body in bodies.iter().flatten() {
        parsed += parse_write(body.as_bytes(), Precision::Nanoseconds, 0).readings;
    }
    let (wall, cpu) = (start.elapsed().as_secs_f64(), cpu_us() - cpu);
    assert_eq!(parsed as f64, readings);
    println!(
        "parse + block encoding: {:.0} lines/s, {:.0} readings/s, {:.3} CPU µs per reading",
        (per_writer * writers) as f64 / wall,
        readings / wall,
        cpu / readings
    );

    let gzipped: Vec<Vec<Vec<u8>>> = bodies.iter().map(|b| b.iter().map(|t| gzip(t.as_bytes())).collect()).collect();
    let dir = tempfile::tempdir()?;
    let config = Config::loopback(
        dir.path(),
        (0..writers).map(|i| AgentConfig { id: format!("telegraf-{i}"), token: format!("t-{i}") }).collect(),
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(tributary_aggregator::serve(config, listener, async {
        let _ = stop_rx.await;
    }));
    let cpu = cpu_us();
    let start = Instant::now();
    std::thread::scope(|s| {
        for (w, bodies) in gzipped.iter().enumerate() {
            s.spawn(move || {
                for body in bodies {
                    let (status, text) = post(addr, &format!("t-{w}"), body);
                    assert_eq!(status, 204, "{text}");
                }
            });
        }
    });
    let (wall, cpu) = (start.elapsed().as_secs_f64(), cpu_us() - cpu);
    println!(
        "POST /write (gzip, {writers} writers, {per_request} lines a request, logged with synchronous=FULL): \
         {:.0} lines/s, {:.0} readings/s, {:.3} CPU µs per reading (whole process, processor included)",
        (per_writer * writers) as f64 / wall,
        readings / wall,
        cpu / readings
    );
    let _ = stop_tx.send(());
    runtime.block_on(server)??;
    Ok(())
}

/// Telegraf-like bodies: `cpu` lines of 200 hosts × 8 cores, 10 s apart, ns timestamps.
fn bodies(writer: usize, lines: usize, per_request: usize) -> Vec<String> {
    let t0 = 1_764_000_000_000_000_000i64;
    let mut out = Vec::new();
    let mut body = String::new();
    for i in 0..lines {
        let noise = (i as f64 * 0.618_033_988_7).fract();
        let ts = t0 + (i / 1600) as i64 * 10_000_000_000;
        body.push_str(&format!(
            "cpu,cpu=cpu{},host=gw{}-{writer} usage_idle={:.3},usage_user={:.3},usage_system={:.3},usage_iowait={:.3},\
             ctx={}i {ts}\n",
            i % 8,
            (i / 8) % 200,
            90.0 + noise * 9.0,
            noise * 5.0,
            noise * 2.0,
            noise,
            i * 7
        ));
        if (i + 1) % per_request == 0 {
            out.push(std::mem::take(&mut body));
        }
    }
    if !body.is_empty() {
        out.push(body);
    }
    out
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).expect("gzip into memory");
    encoder.finish().expect("gzip into memory")
}

/// User + system CPU time of the whole process, in µs.
fn cpu_us() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

fn post(addr: SocketAddr, token: &str, body: &[u8]) -> (u16, String) {
    let mut request = format!(
        "POST /write?db=telegraf HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Token {token}\r\n\
         Content-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(&request).expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response)
}
