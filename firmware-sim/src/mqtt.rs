//! `tributary-sim mqtt`: plays a fleet of simulated devices over MQTT.
//!
//! Devices are simulated, not separate TCP clients: they share one connection (or `--connections K`).
//! Each connection has a poller task that only drives rumqttc's event loop and counts what it sees
//! (publishes written, PubAcks received); device tasks publish through the client. Publishing from
//! the polling task would deadlock once the request channel fills (a known rumqttc pitfall).
//!
//! With QoS 1 a run ends only when every publish has been acknowledged, so `--count N` means N
//! messages per device delivered to the broker; the clock stops at the last PubAck.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{MissedTickBehavior, interval_at};

use crate::device::Device;
use crate::payload::Format;
use crate::shutdown::Shutdown;

/// Requests rumqttc buffers between the device tasks and the event loop. Large enough that the
/// event loop always has work at full speed; small enough that a stop drains in milliseconds.
const REQUEST_CHANNEL_CAPACITY: usize = 1024;

/// Unacknowledged QoS 1 publishes per connection. With rumqttc's default of 100 the writer waits
/// for PubAcks: on loopback against Mosquitto, 1000 published about 25% more messages per second.
const MAX_INFLIGHT: u16 = 1000;

/// Reconnect backoff: rumqttc retries at once after an error, so we sleep ourselves.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// After a stop is requested, how long to wait for outstanding PubAcks before disconnecting anyway.
const ACK_GRACE: Duration = Duration::from_secs(10);

/// How long a clean disconnect may take before the connection is dropped.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct MqttArgs {
    /// Broker address, host:port.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub broker: BrokerAddr,
    /// Number of simulated devices, numbered from 1 (topic `<prefix>/dev-<n>`).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub devices: u32,
    /// Time between two messages of one device (humantime: 1s, 250ms); 0 publishes as fast as possible.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Messages per device; 0 runs until Ctrl-C or SIGTERM.
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Payload format.
    #[arg(long, value_enum, default_value_t = Format::Multi)]
    pub format: Format,
    /// First topic level.
    #[arg(long, default_value = "sensors")]
    pub topic_prefix: String,
    /// MQTT QoS: 0 (fire and forget) or 1 (the broker acknowledges every message).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Seed of the fleet's signal models: the same seed plays the same devices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// MQTT client id; with several connections, `-<k>` is appended.
    #[arg(long, default_value = "sim")]
    pub client_id: String,
    /// MQTT connections to spread the devices over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,
}

/// `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl FromStr for BrokerAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not host:port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        let port = port.parse().map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        Ok(BrokerAddr { host: host.to_string(), port })
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

pub(crate) fn parse_interval(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (try 1s, 250ms or 0)"))
}

/// What a run delivered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Messages the broker has: acknowledged (QoS 1) or written to the connection (QoS 0).
    pub messages: u64,
    /// Readings the agent makes from them.
    pub readings: u64,
    /// From the first publish to the last acknowledgement (QoS 1) or write (QoS 0).
    pub elapsed: Duration,
    /// Messages published but not confirmed when the run had to give up waiting.
    pub undelivered: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        write!(
            f,
            "published {} messages ({} readings) in {:.3} s: {:.0} msg/s, {:.0} readings/s",
            self.messages,
            self.readings,
            secs,
            rate(self.messages),
            rate(self.readings)
        )
    }
}

/// Counts of one connection, kept by its device tasks (`queued`) and its poller (the rest).
#[derive(Debug, Default)]
struct Counters {
    /// Publishes handed to rumqttc's request channel.
    queued: AtomicU64,
    /// Publishes written to the connection (a replay after a reconnect counts again).
    written: AtomicU64,
    /// PubAcks received.
    acked: AtomicU64,
}

impl Counters {
    fn delivered(&self, qos: QoS) -> u64 {
        let queued = self.queued.load(Ordering::Acquire);
        let confirmed = match qos {
            QoS::AtMostOnce => self.written.load(Ordering::Acquire),
            _ => self.acked.load(Ordering::Acquire),
        };
        confirmed.min(queued)
    }

    fn outstanding(&self, qos: QoS) -> u64 {
        self.queued.load(Ordering::Acquire) - self.delivered(qos)
    }
}

struct Connection {
    client: AsyncClient,
    counters: Arc<Counters>,
    connected: watch::Receiver<bool>,
    poller: tokio::task::JoinHandle<()>,
}

impl Connection {
    fn open(broker: &BrokerAddr, client_id: String) -> Self {
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(MAX_INFLIGHT)
            .set_request_channel_capacity(REQUEST_CHANNEL_CAPACITY);
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        let counters = Arc::new(Counters::default());
        let (connected_tx, connected) = watch::channel(false);
        let poller = tokio::spawn(poll(eventloop, counters.clone(), connected_tx, broker.to_string()));
        Connection { client, counters, connected, poller }
    }

    /// Sends DISCONNECT after everything already queued, and waits for the poller to write it.
    async fn close(self) {
        let Connection { client, mut poller, connected, .. } = self;
        // A connection that is down has nothing to flush; don't wait for it to come back.
        let up = *connected.borrow();
        if up && client.disconnect().await.is_ok() {
            drop(client);
            if tokio::time::timeout(DISCONNECT_TIMEOUT, &mut poller).await.is_ok() {
                return;
            }
            tracing::warn!("the broker did not take the disconnect in time; dropping the connection");
        }
        poller.abort();
    }
}

/// Drives one connection's event loop until it has written DISCONNECT.
async fn poll(mut eventloop: EventLoop, counters: Arc<Counters>, connected: watch::Sender<bool>, broker: String) {
    let mut backoff = MIN_BACKOFF;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                counters.acked.fetch_add(1, Ordering::Release);
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                counters.written.fetch_add(1, Ordering::Release);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(%broker, client_id = %eventloop.mqtt_options.client_id(), "connected");
                backoff = MIN_BACKOFF;
                connected.send_replace(true);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            // Every client handle is gone: nothing more can be sent.
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                connected.send_replace(false);
                tracing::warn!(%broker, error = %e, "MQTT connection failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// What every device task does.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    interval: Duration,
    count: u64,
    format: Format,
    qos: QoS,
}

/// Plays one device: sample, format into the device's own buffer, publish, until its count is
/// reached or a stop is requested.
async fn play(
    mut device: Device,
    topic: String,
    client: AsyncClient,
    counters: Arc<Counters>,
    schedule: Schedule,
    first_tick: tokio::time::Instant,
    mut shutdown: Shutdown,
) {
    let mut ticker = (!schedule.interval.is_zero()).then(|| {
        let mut ticker = interval_at(first_tick, schedule.interval);
        // A device that fell behind keeps its interval rather than bursting to catch up.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    let mut published = 0u64;
    while schedule.count == 0 || published < schedule.count {
        match ticker.as_mut() {
            Some(ticker) => tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.requested() => break,
            },
            None if shutdown.is_requested() => break,
            None => {}
        }
        // The only allocations per message are the ones rumqttc's Publish needs (payload, topic).
        let payload = Bytes::copy_from_slice(device.payload(now_ms(), schedule.format).as_bytes());
        tokio::select! {
            biased;
            sent = client.publish_bytes(topic.as_str(), schedule.qos, false, payload) => {
                if let Err(e) = sent {
                    tracing::warn!(device = device.id(), error = %e, "publish failed; device stops");
                    break;
                }
            }
            _ = shutdown.requested() => break,
        }
        counters.queued.fetch_add(1, Ordering::Release);
        published += 1;
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Runs the fleet until every device has published `--count` messages (and the broker has them),
/// or until `shutdown`.
pub async fn run(args: &MqttArgs, mut shutdown: Shutdown) -> anyhow::Result<Report> {
    let qos = if args.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
    let prefix = args.topic_prefix.trim_end_matches('/');
    anyhow::ensure!(
        !prefix.is_empty() && !prefix.contains(['+', '#']),
        "--topic-prefix {:?} must be non-empty and free of MQTT wildcards",
        args.topic_prefix
    );
    let k = args.connections.min(args.devices);
    let connections: Vec<Connection> = (1..=k)
        .map(|i| {
            let id = if k == 1 { args.client_id.clone() } else { format!("{}-{i}", args.client_id) };
            Connection::open(&args.broker, id)
        })
        .collect();

    // The clock measures publishing, not connection set-up: start once every connection is up.
    for connection in &connections {
        let mut connected = connection.connected.clone();
        tokio::select! {
            up = connected.wait_for(|up| *up) => { up.context("MQTT connection task ended")?; }
            _ = shutdown.requested() => break,
        }
    }

    let schedule = Schedule { interval: args.interval, count: args.count, format: args.format, qos };
    tracing::info!(
        broker = %args.broker, devices = args.devices, connections = k, interval = ?args.interval,
        count = args.count, format = ?args.format, qos = args.qos, "playing devices"
    );
    let start = Instant::now();
    let tick_start = tokio::time::Instant::now();
    let mut devices = JoinSet::new();
    for n in 1..=args.devices {
        let device = Device::new(n, args.seed);
        let topic = format!("{prefix}/{}", device.id());
        let connection = &connections[((n - 1) % k) as usize];
        // Spread the devices over the interval instead of waking them all on the same tick.
        let first_tick = tick_start + args.interval.mul_f64(f64::from(n - 1) / f64::from(args.devices));
        devices.spawn(play(
            device,
            topic,
            connection.client.clone(),
            connection.counters.clone(),
            schedule,
            first_tick,
            shutdown.clone(),
        ));
    }
    while devices.join_next().await.is_some() {}

    // Wait until the broker has every message. Without a stop request this waits as long as it
    // takes (rumqttc replays unacknowledged publishes after a reconnect); after one, ACK_GRACE.
    let mut deadline = None;
    let undelivered = loop {
        let outstanding: u64 = connections.iter().map(|c| c.counters.outstanding(qos)).sum();
        if outstanding == 0 {
            break 0;
        }
        if shutdown.is_requested() {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + ACK_GRACE);
            if Instant::now() >= deadline {
                tracing::warn!(outstanding, "giving up waiting for the broker to confirm every message");
                break outstanding;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let elapsed = start.elapsed();
    let messages = connections.iter().map(|c| c.counters.delivered(qos)).sum::<u64>();
    for connection in connections {
        connection.close().await;
    }
    Ok(Report { messages, readings: messages * args.format.readings(), elapsed, undelivered })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_are_host_and_port() {
        assert_eq!("127.0.0.1:1883".parse(), Ok(BrokerAddr { host: "127.0.0.1".into(), port: 1883 }));
        assert_eq!("[::1]:1884".parse(), Ok(BrokerAddr { host: "::1".into(), port: 1884 }));
        assert!("localhost".parse::<BrokerAddr>().is_err());
        assert!(":1883".parse::<BrokerAddr>().is_err());
        assert!("host:99999".parse::<BrokerAddr>().is_err());
    }

    #[test]
    fn intervals_are_humantime_or_zero() {
        assert_eq!(parse_interval("0"), Ok(Duration::ZERO));
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_interval("soon").is_err());
    }

    #[test]
    fn the_final_line_has_the_agreed_shape() {
        let report = Report { messages: 150, readings: 450, elapsed: Duration::from_millis(1500), undelivered: 0 };
        assert_eq!(report.to_string(), "published 150 messages (450 readings) in 1.500 s: 100 msg/s, 300 readings/s");
    }
}
