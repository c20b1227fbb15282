//! The agent's TOML configuration. Every default is documented here and in `deploy/agent.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tributary_shared::config_file;

/// The commented example configuration, printed by `tributary-agent generate-config`.
pub const EXAMPLE: &str = include_str!("../../deploy/agent.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This gateway's id, as listed in the aggregator's `[[agents]]`. Required.
    pub agent_id: String,
    /// Directory of the SQLite spool (`spool.db`). Required; created if missing.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub http: HttpConfig,
    /// Where batches go. Required.
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    /// Serial ports to read (`[[serial]]` tables, any number). Default: none.
    #[serde(default)]
    pub serial: Vec<SerialConfig>,
    /// Pre-filters (`[[filter]]` tables, any number; the first whose `sensor` glob matches a
    /// sensor applies to it). Default: none. See [`crate::filter`].
    #[serde(default)]
    pub filter: Vec<crate::filter::FilterConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/healthz` and `/metrics`. Default `127.0.0.1:9101`.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the aggregator, e.g. `http://127.0.0.1:8080` or, behind a reverse proxy,
    /// `https://host/tributary` (a path is kept: requests go to `<url>/api/v1/ingest`). Required.
    pub url: url::Url,
    /// Bearer token the aggregator knows this agent by. Required, here or in `token_file`.
    /// `${NAME}` in it is replaced by the environment variable NAME (e.g. `token = "${TRIBUTARY_TOKEN}"`).
    #[serde(default)]
    pub token: String,
    /// A file holding the token (surrounding whitespace ignored), e.g. a systemd credential;
    /// relative to the configuration file. Instead of `token`.
    pub token_file: Option<std::path::PathBuf>,
    /// Most readings sent in one request. Default 50,000.
    #[serde(default = "default_batch_max_readings")]
    pub batch_max_readings: usize,
    /// Time limit of one request. Default 30 s.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First retry delay after a failed request; doubles up to `retry_max`, with full jitter. Default 100 ms.
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest retry delay. Default 30 s.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// For an `https://` url: the CA certificates (PEM, one or more) the aggregator's certificate
    /// must be signed by, relative to the configuration file. When set, only these are trusted, not
    /// the system's: a certificate for the aggregator's name from any other CA is refused.
    /// Default: none (the system's CA certificates, e.g. `/etc/ssl/certs`).
    pub ca_file: Option<PathBuf>,
    /// This agent's certificate (PEM; intermediates after it), shown to an aggregator that asks for
    /// one (`[http] tls_client_ca`), relative to the configuration file. Set with `client_key`.
    /// Default: none.
    pub client_cert: Option<PathBuf>,
    /// The private key of `client_cert` (PEM: PKCS#8, PKCS#1 or SEC1), relative to the
    /// configuration file. Default: none.
    pub client_key: Option<PathBuf>,
    /// The TLS settings of an `https://` url, made from the files above when the configuration is
    /// loaded (so that a missing or broken file is a configuration error, not a forwarder that
    /// never connects). `None` for `http://`.
    #[serde(skip)]
    pub tls: Option<UpstreamTls>,
}

/// The rustls settings of an `https://` upstream, made at load from `ca_file`, `client_cert` and
/// `client_key`.
#[derive(Clone)]
pub struct UpstreamTls(pub Arc<rustls::ClientConfig>);

// rustls' own Debug lists every trusted root (the system has hundreds) and the session cache, which
// changes as the forwarder connects: useless in a log, and it would make two loads of the same
// file differ when configurations are compared (SIGHUP). The file names are in the config already.
impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpstreamTls(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// Run a rumqttd broker inside the agent; sensors publish to it.
    Embedded,
    /// Join an existing broker (Mosquitto, EMQX) as a client with a persistent session.
    Client,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `embedded` (default) or `client`.
    #[serde(default = "default_mqtt_mode")]
    pub mode: MqttMode,
    /// Embedded mode: the broker's listen address. Default `127.0.0.1:1883`.
    #[serde(default = "default_mqtt_listen")]
    pub listen: SocketAddr,
    /// Client mode: the broker, `mqtt://host:port` (port defaults to 1883), or `mqtts://host:port`
    /// for MQTT over TLS (port defaults to 8883). Required in client mode.
    pub url: Option<url::Url>,
    /// Client mode: the MQTT client id of the persistent session. Default `tributary-<agent_id>`.
    pub client_id: Option<String>,
    /// Topic filters to read. The sensor id is the topic after the filter's fixed prefix
    /// (the levels before its first wildcard). Default `["sensors/#"]`.
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
    /// Larger payloads are rejected and counted. Default 262,144 (256 KiB). The embedded broker
    /// disconnects a client whose packet exceeds 8 times this; in client mode such a packet costs a
    /// reconnection, then is read once, rejected and acknowledged (see [`crate::input::mqtt`]).
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// A message of more readings (numeric fields of one object) is rejected whole and counted as
    /// `too_many_readings`. Default 1,000.
    #[serde(default = "default_max_readings_per_message")]
    pub max_readings_per_message: usize,
    /// Embedded mode: how far clients may get ahead of the agent, and the size of the broker's
    /// in-memory log for the gateway's other MQTT clients, in rumqttd's measure (4 bytes + topic +
    /// payload per message). Clients wait (their connection is not read) while the agent has half
    /// this handed over and not yet taken, so nothing is lost; a larger value lets bursts through
    /// without waits at the cost of memory. Other subscribers read from a log of this size (about
    /// five times that in memory for small messages), which evicts its oldest messages when full
    /// (a subscriber that falls that far behind misses them; the agent does not read it). Default
    /// 131,072 (128 KiB), at least 16,384.
    #[serde(default = "default_broker_buffer_bytes")]
    pub broker_buffer_bytes: usize,
    /// Embedded mode: the clients allowed to connect (`[[mqtt.users]]` tables). When any are listed,
    /// a client must present one's username and password or is refused at CONNECT (counted as
    /// `tributary_agent_broker_auth_failures_total`). Default: none, every client is let in.
    #[serde(default)]
    pub users: Vec<MqttUser>,
    /// Client mode: the username the agent logs in to the broker with. Default: none (or the
    /// url's `mqtt://user:password@host`).
    pub username: Option<String>,
    /// Client mode: the password of `username`; `${NAME}` in it is replaced by the environment
    /// variable NAME. Default: none.
    #[serde(default)]
    pub password: String,
    /// Client mode: a file holding the password (surrounding whitespace ignored), relative to the
    /// configuration file. Instead of `password`. Default: none.
    pub password_file: Option<PathBuf>,
    /// Embedded mode: a second listener, for MQTT over TLS (conventionally port 8883), beside the
    /// plain one on `listen`. Set with `tls_cert` and `tls_key`. Default: none.
    pub tls_listen: Option<SocketAddr>,
    /// Embedded mode: the broker's certificate on `tls_listen` (PEM; intermediates after it),
    /// relative to the configuration file. Default: none.
    pub tls_cert: Option<PathBuf>,
    /// Embedded mode: the private key of `tls_cert` (PEM: PKCS#8, PKCS#1 or SEC1). Default: none.
    pub tls_key: Option<PathBuf>,
    /// Embedded mode: the CA certificates (PEM) that clients' certificates must be signed by on
    /// `tls_listen`; a client without such a certificate is refused at the handshake. Default:
    /// none (no client certificate asked for).
    pub tls_client_ca: Option<PathBuf>,
    /// Client mode, `mqtts://` url: the CA certificates (PEM) the broker's certificate must be signed
    /// by, relative to the configuration file. When set, only these are trusted, not the system's.
    /// Default: none (the system's CA certificates).
    pub ca_file: Option<PathBuf>,
    /// Client mode, `mqtts://` url: the agent's certificate (PEM), shown to a broker that asks for
    /// one (Mosquitto: `require_certificate true`). Set with `client_key`. Default: none.
    pub client_cert: Option<PathBuf>,
    /// Client mode: the private key of `client_cert` (PEM). Default: none.
    pub client_key: Option<PathBuf>,
    /// The TLS settings made at load from the files above (so that a missing or broken file is a
    /// configuration error): the embedded broker's for `tls_listen`, or the client's for an
    /// `mqtts://` url. `None` without TLS.
    #[serde(skip)]
    pub tls: Option<MqttTls>,
}

/// The rustls settings of `[mqtt]`, made at load.
#[derive(Clone)]
pub enum MqttTls {
    /// The embedded broker's `tls_listen`: from `tls_cert`, `tls_key` and `tls_client_ca`.
    Server(Arc<rustls::ServerConfig>),
    /// Client mode with an `mqtts://` url: from `ca_file`, `client_cert` and `client_key`.
    Client(Arc<rustls::ClientConfig>),
}

// Not rustls' own Debug, as for UpstreamTls.
impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MqttTls::Server(_) => f.write_str("MqttTls::Server(..)"),
            MqttTls::Client(_) => f.write_str("MqttTls::Client(..)"),
        }
    }
}

/// One client of the embedded broker (`[[mqtt.users]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttUser {
    /// The username the client presents at CONNECT. Required.
    pub username: String,
    /// Its password; `${NAME}` in it is replaced by the environment variable NAME. Required, here
    /// or in `password_file`.
    #[serde(default)]
    pub password: String,
    /// A file holding the password (surrounding whitespace ignored), relative to the configuration
    /// file. Instead of `password`.
    pub password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// How far a reading's timestamp may be ahead of the gateway clock. Default 5 minutes.
    /// (Old timestamps are accepted: a device delivering its backlog is normal.)
    #[serde(default = "default_max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Sensor ids the agent has not seen lately that it lets in per minute (a burst of this many,
    /// then this many a minute); readings of further new ids are rejected and counted as
    /// `sensor_limit`. Set it above the number of sensors the gateway serves, or a start-up loses
    /// readings until all are known. The agent remembers up to 100,000 recent ids (more when this
    /// is above 5,000). 0 turns the limit off. Default 1,000.
    #[serde(default = "default_max_new_sensors_per_minute")]
    pub max_new_sensors_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Every commit is fsync'ed within `spool.sync_interval` (at once with `"0s"`): a power cut
    /// loses at most that much of what was committed.
    Full,
    /// fsync at checkpoints only: survives a process crash; a power cut may lose minutes of commits.
    Normal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Group-commit interval under load while an input's acknowledgements wait for commits (client
    /// mode: each PUBACK waits for its message's commit, and a broker sends no more than its
    /// inflight window, Mosquitto's 20, ahead of them): readings arriving within it share one block
    /// and one commit. Default 5 ms.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Group-commit interval under load while no input waits for commits (the embedded broker
    /// acknowledges from its own log, serial ports acknowledge nothing): a commit then carries this
    /// long of readings (250 at 10,000 readings/s) in one block, a page or two of WAL and one
    /// request to the aggregator, instead of `commit_interval`'s. It bounds, under load, how long a
    /// reading waits to be committed and forwarded, and in embedded mode what a crash can lose of
    /// what the broker acknowledged. Kept within `commit_interval ..= max_commit_interval`; below 8
    /// readings an interval it changes nothing (320 readings/s at 25 ms). Default 25 ms.
    #[serde(default = "default_gather_interval", with = "humantime_serde")]
    pub gather_interval: Duration,
    /// While readings are few, the interval grows up to this, so that a commit holds several of
    /// them (a commit costs a page or two of flash whatever it holds); it is back at
    /// `gather_interval` (`commit_interval` in client mode) as soon as a commit holds many. A
    /// reading after a quiet spell is committed at once. It bounds how long a reading waits to be
    /// committed and forwarded: in embedded mode, what a crash can lose of what the broker
    /// acknowledged; in client mode, how late a PUBACK goes out. Equal to `commit_interval`: a
    /// fixed interval. Default 4 s.
    #[serde(default = "default_max_commit_interval", with = "humantime_serde")]
    pub max_commit_interval: Duration,
    /// Most readings in one block. Default 10,000.
    #[serde(default = "default_max_block_readings")]
    pub max_block_readings: usize,
    /// Readings held in memory (24 bytes each) while a commit is in progress, e.g. behind a slow
    /// fsync. Beyond it the input waits: an external broker keeps the messages; the embedded broker
    /// stops reading its clients' connections (see `mqtt.broker_buffer_bytes`). Default 1,000,000.
    #[serde(default = "default_max_queued_readings")]
    pub max_queued_readings: usize,
    /// `full` (default) or `normal`; see [`SyncMode`].
    #[serde(default = "default_sync")]
    pub sync: SyncMode,
    /// With `sync = "full"`: commits are visible to the forwarder (and safe from a process crash)
    /// at once, and fsync'ed at most this long after; a power cut loses at most this much. `"0s"`:
    /// every commit is fsync'ed before anything learns of it. Default 30 s (the kernel's own
    /// writeback of dirty pages takes about as long).
    #[serde(default = "default_sync_interval", with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Spool size limit in bytes of stored blocks; beyond it readings are dropped by `overflow`
    /// and counted (the aggregator records the gap). If it does not fit on the spool's file system
    /// (free space plus the spool's current size), the agent uses 80 % of what fits and logs it.
    /// Default 1 GiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// What to drop when the spool reaches `max_bytes` or its file system is full: `drop_oldest`
    /// (default: the oldest stored blocks make room) or `drop_newest` (arriving readings are
    /// dropped; they still consume sequence numbers, so the aggregator records the hole).
    #[serde(default)]
    pub overflow: Overflow,
    /// Readings stored longer than this are dropped, oldest first, and counted (the aggregator
    /// records the gap), e.g. "7d". The age is by the gateway's clock at storing; readings stored
    /// while the clock read before 2020 (not set yet) do not expire by age. Default: none, only
    /// `max_bytes` bounds the spool.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Delete the oldest stored blocks to make room for new readings.
    #[default]
    DropOldest,
    /// Keep what is stored; drop arriving readings that do not fit.
    DropNewest,
}

/// How a serial device writes its readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialFormat {
    /// Binary frames with a CRC (`tributary_shared::frame`): corruption is detected.
    Frames,
    /// Text lines, `sensor=value[,sensor=value...]` or a bare number, ended by `\n` or `\r\n`.
    Lines,
}

/// One serial port, read beside the MQTT input. Documented in `deploy/agent.toml` and the README.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The device, e.g. `/dev/ttyUSB0`, or a stable `/dev/serial/by-id/...` link, which is
    /// resolved again at every (re)open. Required. Its file name is the port's name in metrics.
    pub path: PathBuf,
    /// Baud rate. Default 115200.
    #[serde(default = "default_serial_baud")]
    pub baud: u32,
    /// `frames` or `lines`; see [`SerialFormat`]. Required.
    pub format: SerialFormat,
    /// Sensor ids become `<sensor_prefix>/<id>`, and a bare number's id is the prefix itself.
    /// Default: none (ids as the device sends them; a bare number's id is the port's name).
    pub sensor_prefix: Option<String>,
}

impl SerialConfig {
    /// The port's name: the file name of `path` as configured (a by-id link keeps its name
    /// across re-enumeration, where the device it points to may not).
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.path.display().to_string())
    }
}

fn default_serial_baud() -> u32 {
    115_200
}

/// `[clock]`: gateways without a real-time clock, and devices whose clocks are off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// How the agent learns that the gateway clock is synchronised: `"adjtimex"` (the kernel's
    /// NTP state, as chrony, ntpd and systemd-timesyncd set it: set this on gateways without a
    /// real-time clock) or `"none"` (trust the clock, as on a gateway with a real-time clock).
    /// Default `"none"`: many hosts whose clock is right never tell the kernel (containers, VMs,
    /// no NTP daemon), and there `"adjtimex"` would hold every reading the agent stamps.
    #[serde(default)]
    pub sync_check: SyncCheck,
    /// How long blocks of readings the agent stamped before the clock was first synchronised
    /// wait in the spool for it (then they are re-stamped and sent); past this they go out
    /// flagged and the aggregator quarantines them. `"0s"` sends them flagged at once. Default 10 minutes.
    #[serde(default = "default_hold_unsynced", with = "humantime_serde")]
    pub hold_unsynced: Duration,
    /// What happens to a device timestamp more than `validation.max_clock_skew` ahead of the
    /// synchronised gateway clock (or older than `max_device_age`): `"reject"` (counted as
    /// `bad_timestamp`), `"restamp"` (the agent's receive time replaces it) or `"flag"` (kept,
    /// sent flagged, quarantined by the aggregator as `device_clock_skew`). Default `"reject"`.
    #[serde(default)]
    pub on_device_skew: OnDeviceSkew,
    /// Device timestamps older than this, against the synchronised gateway clock, are treated as
    /// skewed too. Unset by default: old timestamps are normal for a device delivering its backlog.
    #[serde(default, with = "humantime_serde")]
    pub max_device_age: Option<Duration>,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            sync_check: SyncCheck::default(),
            hold_unsynced: default_hold_unsynced(),
            on_device_skew: OnDeviceSkew::default(),
            max_device_age: None,
        }
    }
}

fn default_hold_unsynced() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncCheck {
    Adjtimex,
    #[default]
    None,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeviceSkew {
    #[default]
    Reject,
    Restamp,
    Flag,
}

/// `[health]`: the gateway's own health as readings (see [`crate::health`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// How often `_agent/<id>/cpu`, `rss_bytes`, `disk_free_bytes`, `spool_bytes`,
    /// `spool_readings` and `clock_synced` are sampled; `"0s"` turns them off. Default 60 s.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig { interval: default_health_interval() }
    }
}

fn default_health_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9101))
}
fn default_batch_max_readings() -> usize {
    50_000
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}
fn default_mqtt_mode() -> MqttMode {
    MqttMode::Embedded
}
fn default_mqtt_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}
fn default_topics() -> Vec<String> {
    vec!["sensors/#".to_string()]
}
fn default_max_payload_bytes() -> usize {
    256 * 1024
}
fn default_broker_buffer_bytes() -> usize {
    128 * 1024
}
fn default_max_readings_per_message() -> usize {
    1_000
}
fn default_max_new_sensors_per_minute() -> u32 {
    // Above any one gateway's fleet, so a restart (every id new again) loses nothing; a publisher
    // inventing ids is still held to this many a minute.
    10_000
}
fn default_max_clock_skew() -> Duration {
    Duration::from_secs(300)
}
fn default_commit_interval() -> Duration {
    Duration::from_millis(5)
}
fn default_gather_interval() -> Duration {
    Duration::from_millis(25)
}
fn default_max_commit_interval() -> Duration {
    Duration::from_secs(4)
}
fn default_sync_interval() -> Duration {
    Duration::from_secs(30)
}
/// Upper bounds of `spool.max_commit_interval` and `spool.sync_interval`.
const MAX_COMMIT_INTERVAL: Duration = Duration::from_secs(60);
const MAX_SYNC_INTERVAL: Duration = Duration::from_secs(3600);
fn default_max_block_readings() -> usize {
    10_000
}
fn default_max_queued_readings() -> usize {
    1_000_000
}
fn default_sync() -> SyncMode {
    SyncMode::Full
}
fn default_max_bytes() -> u64 {
    1 << 30
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: default_http_listen() }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            mode: default_mqtt_mode(),
            listen: default_mqtt_listen(),
            url: None,
            client_id: None,
            topics: default_topics(),
            max_payload_bytes: default_max_payload_bytes(),
            max_readings_per_message: default_max_readings_per_message(),
            broker_buffer_bytes: default_broker_buffer_bytes(),
            users: Vec::new(),
            username: None,
            password: String::new(),
            password_file: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            tls: None,
        }
    }
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            max_clock_skew: default_max_clock_skew(),
            max_new_sensors_per_minute: default_max_new_sensors_per_minute(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            commit_interval: default_commit_interval(),
            gather_interval: default_gather_interval(),
            max_commit_interval: default_max_commit_interval(),
            max_block_readings: default_max_block_readings(),
            max_queued_readings: default_max_queued_readings(),
            sync: default_sync(),
            sync_interval: default_sync_interval(),
            max_bytes: default_max_bytes(),
            overflow: Overflow::default(),
            max_age: None,
        }
    }
}

pub use tributary_shared::config_file::ConfigError;

impl UpstreamConfig {
    /// The aggregator's ingest endpoint, below `url` (normalised at load to end with `/`).
    pub fn ingest_url(&self) -> Result<url::Url, url::ParseError> {
        self.url.join("api/v1/ingest")
    }
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = config_file::load(path)?;
        config.resolve_secrets(path).map_err(|(key, reason)| ConfigError::invalid(path, key, reason))?;
        config.load_tls(path).map_err(|(key, reason)| ConfigError::invalid(path, key, reason))?;
        config.normalise();
        config.check().map_err(|(key, reason)| ConfigError::invalid(path, key, reason))?;
        config.check_filters().map_err(|(key, reason)| ConfigError::invalid(path, key, reason))?;
        Ok(config)
    }

    /// Parses and checks configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = config_file::parse(text, file)?;
        config.resolve_secrets(file).map_err(|(key, reason)| ConfigError::invalid(file, key, reason))?;
        config.load_tls(file).map_err(|(key, reason)| ConfigError::invalid(file, key, reason))?;
        config.normalise();
        config.check().map_err(|(key, reason)| ConfigError::invalid(file, key, reason))?;
        config.check_filters().map_err(|(key, reason)| ConfigError::invalid(file, key, reason))?;
        Ok(config)
    }

    /// Reads `token_file` and the MQTT `password_file`s and replaces `${NAME}` in the token and
    /// passwords by the environment's values, so that no secret need sit in the file itself.
    fn resolve_secrets(&mut self, file: &Path) -> Result<(), (&'static str, String)> {
        let upstream = &mut self.upstream;
        let keys = ("upstream.token", "upstream.token_file");
        resolve_secret(&mut upstream.token, upstream.token_file.as_deref(), file, keys, "")?;
        let mqtt = &mut self.mqtt;
        let keys = ("mqtt.password", "mqtt.password_file");
        resolve_secret(&mut mqtt.password, mqtt.password_file.as_deref(), file, keys, "")?;
        for (i, user) in mqtt.users.iter_mut().enumerate() {
            let at = format!("[[mqtt.users]] #{} ({:?}): ", i + 1, user.username);
            let keys = ("mqtt.users.password", "mqtt.users.password_file");
            resolve_secret(&mut user.password, user.password_file.as_deref(), file, keys, &at)?;
        }
        Ok(())
    }

    /// Reads the TLS files of `[upstream]` and `[mqtt]` (relative to the configuration file) and
    /// makes their TLS settings.
    fn load_tls(&mut self, file: &Path) -> Result<(), (&'static str, String)> {
        self.load_upstream_tls(file)?;
        self.load_mqtt_tls(file)
    }

    /// Reads `ca_file`, `client_cert` and `client_key` (relative to the configuration file) and
    /// makes the TLS settings of an `https://` url from them.
    fn load_upstream_tls(&mut self, file: &Path) -> Result<(), (&'static str, String)> {
        let upstream = &mut self.upstream;
        let set = [
            ("upstream.ca_file", upstream.ca_file.is_some()),
            ("upstream.client_cert", upstream.client_cert.is_some()),
            ("upstream.client_key", upstream.client_key.is_some()),
        ];
        if upstream.url.scheme() != "https" {
            // Refused rather than ignored: whoever set these meant the token to travel encrypted.
            if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
                return Err((key, format!("TLS needs an https:// upstream.url, not {}", upstream.url)));
            }
            return Ok(());
        }
        let files = ClientTlsFiles {
            ca_file: upstream.ca_file.as_deref(),
            client_cert: upstream.client_cert.as_deref(),
            client_key: upstream.client_key.as_deref(),
        };
        let mut tls = client_tls(&UPSTREAM_TLS_KEYS, "https", &files, file)?;
        // HTTP/1.1 only, as reqwest offers it when it builds TLS itself (no http2 feature here).
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        upstream.tls = Some(UpstreamTls(Arc::new(tls)));
        Ok(())
    }

    /// `[mqtt]`'s TLS: the embedded broker's `tls_listen` (from `tls_cert`, `tls_key`,
    /// `tls_client_ca`), or client mode's `mqtts://` url (from `ca_file`, `client_cert`,
    /// `client_key`); each mode's keys refused in the other.
    fn load_mqtt_tls(&mut self, file: &Path) -> Result<(), (&'static str, String)> {
        let mqtt = &mut self.mqtt;
        let server_keys = [
            ("mqtt.tls_listen", mqtt.tls_listen.is_some()),
            ("mqtt.tls_cert", mqtt.tls_cert.is_some()),
            ("mqtt.tls_key", mqtt.tls_key.is_some()),
            ("mqtt.tls_client_ca", mqtt.tls_client_ca.is_some()),
        ];
        let client_keys = [
            ("mqtt.ca_file", mqtt.ca_file.is_some()),
            ("mqtt.client_cert", mqtt.client_cert.is_some()),
            ("mqtt.client_key", mqtt.client_key.is_some()),
        ];
        let first_set = |keys: &[(&'static str, bool)]| keys.iter().find(|(_, set)| *set).map(|(key, _)| *key);
        match mqtt.mode {
            MqttMode::Embedded => {
                if let Some(key) = first_set(&client_keys) {
                    return Err((
                        key,
                        "is how the agent checks a broker it joins in client mode (mqtts://); the embedded \
                         broker's TLS keys are tls_listen, tls_cert, tls_key and tls_client_ca"
                            .into(),
                    ));
                }
                let Some(listen) = mqtt.tls_listen else {
                    if let Some(key) = first_set(&server_keys) {
                        return Err((
                            "mqtt.tls_listen",
                            format!("required with {}: the TLS listener's address, e.g. \"0.0.0.0:8883\"", short(key)),
                        ));
                    }
                    return Ok(());
                };
                if listen == mqtt.listen && listen.port() != 0 {
                    return Err((
                        "mqtt.tls_listen",
                        format!("{listen} is mqtt.listen's address too: TLS needs a listener of its own (port 8883)"),
                    ));
                }
                let relative = |path: &Path| relative_to(file, path);
                let (cert, key) = match (&mqtt.tls_cert, &mqtt.tls_key) {
                    (Some(cert), Some(key)) => (relative(cert), relative(key)),
                    (_, None) => {
                        return Err((
                            "mqtt.tls_key",
                            "required with tls_listen: the PEM file of the broker certificate's private key".into(),
                        ));
                    }
                    (None, Some(_)) => {
                        return Err((
                            "mqtt.tls_cert",
                            "required with tls_listen: the PEM file of the broker's certificate".into(),
                        ));
                    }
                };
                // Explicitly ring, as everywhere in the agent: `--check-config` runs before main installs it.
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ("mqtt.tls_cert", format!("no TLS version to offer: {e}")))?;
                let builder = match &mqtt.tls_client_ca {
                    None => builder.with_no_client_auth(),
                    Some(ca) => {
                        let ca = relative(ca);
                        let roots = read_roots("mqtt.tls_client_ca", &ca)?;
                        let verifier =
                            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                                .build()
                                .map_err(|e| ("mqtt.tls_client_ca", format!("{}: {e}", ca.display())))?;
                        builder.with_client_cert_verifier(verifier)
                    }
                };
                let chain = read_certificates("mqtt.tls_cert", &cert)?;
                let key_der = read_private_key("mqtt.tls_key", &key)?;
                let tls = builder
                    .with_single_cert(chain, key_der)
                    .map_err(|e| ("mqtt.tls_key", key_mismatch(e, &key, &cert)))?;
                mqtt.tls = Some(MqttTls::Server(Arc::new(tls)));
            }
            MqttMode::Client => {
                if let Some(key) = first_set(&server_keys) {
                    return Err((
                        key,
                        "only the embedded broker listens; in client mode TLS is an mqtts:// mqtt.url, with \
                         ca_file (and client_cert, client_key)"
                            .into(),
                    ));
                }
                // A missing url is check()'s to report.
                let Some(url) = &mqtt.url else { return Ok(()) };
                if !is_mqtt_tls(url) {
                    if let Some(key) = first_set(&client_keys) {
                        return Err((
                            key,
                            format!(
                                "TLS needs an mqtts:// mqtt.url (e.g. mqtts://{}:8883), not {url}",
                                url.host_str().unwrap_or("broker")
                            ),
                        ));
                    }
                    return Ok(());
                }
                let files = ClientTlsFiles {
                    ca_file: mqtt.ca_file.as_deref(),
                    client_cert: mqtt.client_cert.as_deref(),
                    client_key: mqtt.client_key.as_deref(),
                };
                let tls = client_tls(&MQTT_TLS_KEYS, url.scheme(), &files, file)?;
                mqtt.tls = Some(MqttTls::Client(Arc::new(tls)));
            }
        }
        Ok(())
    }

    /// `upstream.url` is a base: without a trailing slash, joining `api/v1/ingest` would replace
    /// its last path segment (`http://host/tributary` would post to `http://host/api/v1/ingest`).
    fn normalise(&mut self) {
        if !self.upstream.url.path().ends_with('/') {
            let path = format!("{}/", self.upstream.url.path());
            self.upstream.url.set_path(&path);
        }
    }

    /// Rules serde cannot express.
    fn check(&self) -> Result<(), (&'static str, String)> {
        if let Err(e) = tributary_shared::reading::validate_sensor_id(&self.agent_id) {
            return Err(("agent_id", format!("not a usable id: {e}")));
        }
        if self.upstream.token.is_empty() {
            return Err(("upstream.token", "required: the aggregator's token for this agent, or `token_file`".into()));
        }
        if !matches!(self.upstream.url.scheme(), "http" | "https") {
            return Err(("upstream.url", format!("scheme must be http or https, not {}", self.upstream.url.scheme())));
        }
        if self.upstream.batch_max_readings == 0 {
            return Err(("upstream.batch_max_readings", "must be at least 1".into()));
        }
        if self.upstream.retry_initial.is_zero() || self.upstream.retry_max < self.upstream.retry_initial {
            return Err(("upstream.retry_max", "retry_initial must be > 0 and retry_max >= retry_initial".into()));
        }
        if self.mqtt.topics.is_empty() {
            return Err(("mqtt.topics", "list at least one topic filter".into()));
        }
        for topic in &self.mqtt.topics {
            if !rumqttc::valid_filter(topic) {
                return Err(("mqtt.topics", format!("{topic:?} is not a valid MQTT topic filter")));
            }
        }
        if self.mqtt.max_payload_bytes == 0 {
            return Err(("mqtt.max_payload_bytes", "must be at least 1".into()));
        }
        if self.mqtt.broker_buffer_bytes < 16 * 1024 {
            return Err(("mqtt.broker_buffer_bytes", "must be at least 16384".into()));
        }
        if self.mqtt.max_readings_per_message == 0 {
            return Err(("mqtt.max_readings_per_message", "must be at least 1".into()));
        }
        if self.mqtt.mode == MqttMode::Client {
            match &self.mqtt.url {
                None => return Err(("mqtt.url", "required when mqtt.mode = \"client\"".into())),
                Some(url) if !matches!(url.scheme(), "mqtt" | "tcp" | "mqtts" | "ssl") || url.host_str().is_none() => {
                    return Err(("mqtt.url", format!("expected mqtt://host:port or mqtts://host:port, got {url}")));
                }
                Some(_) => {}
            }
            if self.mqtt.client_id.as_deref() == Some("") {
                return Err(("mqtt.client_id", "must not be empty (a persistent session needs an id)".into()));
            }
        }
        self.check_mqtt_credentials()?;
        if self.spool.max_block_readings == 0 || self.spool.max_block_readings > crate::spool::MAX_BLOCK_READINGS {
            return Err(("spool.max_block_readings", format!("must be 1 to {}", crate::spool::MAX_BLOCK_READINGS)));
        }
        if self.spool.max_queued_readings == 0 {
            return Err(("spool.max_queued_readings", "must be at least 1".into()));
        }
        if self.spool.commit_interval > Duration::from_secs(1) {
            return Err((
                "spool.commit_interval",
                "at most 1s: the embedded broker has acknowledged readings that wait this long".into(),
            ));
        }
        if self.spool.gather_interval > Duration::from_secs(1) {
            return Err((
                "spool.gather_interval",
                "at most 1s: the embedded broker has acknowledged readings that wait this long".into(),
            ));
        }
        if self.spool.max_commit_interval < self.spool.commit_interval {
            return Err((
                "spool.max_commit_interval",
                "must be at least spool.commit_interval (equal: a fixed commit interval)".into(),
            ));
        }
        if self.spool.max_commit_interval > MAX_COMMIT_INTERVAL {
            return Err((
                "spool.max_commit_interval",
                "at most 60s: a quiet gateway's readings wait this long to be committed and forwarded".into(),
            ));
        }
        if self.spool.sync_interval > MAX_SYNC_INTERVAL {
            return Err((
                "spool.sync_interval",
                "at most 1h: a power cut loses up to this much of what was committed (\"0s\": fsync every commit)"
                    .into(),
            ));
        }
        self.check_serial()?;
        Ok(())
    }

    /// Credentials: each in the mode it belongs to, users listed once, no password without a user.
    fn check_mqtt_credentials(&self) -> Result<(), (&'static str, String)> {
        let mqtt = &self.mqtt;
        let client_keys = mqtt.username.is_some() || !mqtt.password.is_empty();
        match mqtt.mode {
            MqttMode::Embedded if client_keys => {
                let key = if mqtt.username.is_some() { "mqtt.username" } else { "mqtt.password" };
                return Err((
                    key,
                    "is how the agent logs in to a broker in client mode; the embedded broker's clients are \
                     listed in [[mqtt.users]]"
                        .into(),
                ));
            }
            MqttMode::Client if !mqtt.users.is_empty() => {
                return Err((
                    "mqtt.users",
                    "only the embedded broker has users; in client mode set mqtt.username and password".into(),
                ));
            }
            _ => {}
        }
        if mqtt.username.as_deref() == Some("") {
            return Err(("mqtt.username", "must not be empty".into()));
        }
        if mqtt.username.is_none() && !mqtt.password.is_empty() {
            return Err(("mqtt.password", "set without mqtt.username: a password needs its username".into()));
        }
        if mqtt.username.is_some() && mqtt.url.as_ref().is_some_and(|url| !url.username().is_empty()) {
            return Err(("mqtt.username", "set here or in mqtt.url (mqtt://user:password@host), not both".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, user) in mqtt.users.iter().enumerate() {
            let at = format!("[[mqtt.users]] #{}", i + 1);
            if user.username.is_empty() {
                return Err(("mqtt.users.username", format!("{at}: must not be empty")));
            }
            if user.password.is_empty() {
                return Err((
                    "mqtt.users.password",
                    format!("{at} ({:?}): required, here or in password_file", user.username),
                ));
            }
            if !names.insert(user.username.as_str()) {
                return Err(("mqtt.users.username", format!("{at}: {:?} is listed twice", user.username)));
            }
        }
        Ok(())
    }

    /// `[[filter]]` rules serde cannot express (min above max, zero intervals, ...).
    fn check_filters(&self) -> Result<(), (String, String)> {
        crate::filter::check(&self.filter)
    }

    /// `[[serial]]` rules: usable baud rates and ids, one input per port.
    fn check_serial(&self) -> Result<(), (&'static str, String)> {
        let mut names = std::collections::HashSet::new();
        for (i, port) in self.serial.iter().enumerate() {
            let at = format!("[[serial]] #{} ({})", i + 1, port.path.display());
            if port.path.as_os_str().is_empty() {
                return Err(("serial.path", format!("{at}: must not be empty")));
            }
            if port.baud == 0 || port.baud > 4_000_000 {
                return Err(("serial.baud", format!("{at}: {} is not a baud rate (1 to 4000000)", port.baud)));
            }
            let name = port.name();
            if !names.insert(name.clone()) {
                return Err((
                    "serial.path",
                    format!("{at}: another port has the name {name:?}; port names (file names) must differ"),
                ));
            }
            match &port.sensor_prefix {
                Some(prefix) => {
                    if let Err(e) = tributary_shared::reading::validate_sensor_id(prefix) {
                        return Err((
                            "serial.sensor_prefix",
                            format!("{at}: {prefix:?} is not a usable sensor id: {e}"),
                        ));
                    }
                }
                None if port.format == SerialFormat::Lines => {
                    if let Err(e) = tributary_shared::reading::validate_sensor_id(&name) {
                        return Err((
                            "serial.sensor_prefix",
                            format!(
                                "{at}: bare numbers would take the port name {name:?}, which is not a usable sensor id ({e}); set sensor_prefix"
                            ),
                        ));
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The MQTT client id used in client mode.
    pub fn mqtt_client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("tributary-{}", self.agent_id))
    }
}

/// The certificates of a PEM file; at least one.
fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, (&'static str, String)> {
    tributary_shared::pem::certificates(path).map_err(|reason| (key, reason))
}

/// The first private key of a PEM file.
fn read_private_key(
    key: &'static str,
    path: &Path,
) -> Result<rustls::pki_types::PrivateKeyDer<'static>, (&'static str, String)> {
    tributary_shared::pem::private_key(path).map_err(|reason| (key, reason))
}

/// A path of the configuration, relative to the configuration file `file`.
fn relative_to(file: &Path, path: &Path) -> PathBuf {
    file.parent().map_or_else(|| path.to_path_buf(), |dir| dir.join(path))
}

/// A key's last part: `tls_cert` of `mqtt.tls_cert`.
fn short(key: &str) -> &str {
    key.rsplit('.').next().unwrap_or(key)
}

/// Whether a client-mode url asks for MQTT over TLS.
pub fn is_mqtt_tls(url: &url::Url) -> bool {
    matches!(url.scheme(), "mqtts" | "ssl")
}

/// The CA certificates of a PEM file, as trust roots.
fn read_roots(key: &'static str, path: &Path) -> Result<rustls::RootCertStore, (&'static str, String)> {
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in read_certificates(key, path)?.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| (key, format!("certificate #{} in {} is not a usable CA: {e}", i + 1, path.display())))?;
    }
    Ok(roots)
}

/// Why a certificate and a private key do not go together.
fn key_mismatch(e: rustls::Error, key: &Path, cert: &Path) -> String {
    match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            format!("{} is not the private key of {}", key.display(), cert.display())
        }
        e => format!("{} cannot sign for {}: {e}", key.display(), cert.display()),
    }
}

/// The keys a client's TLS settings come from, and what its server is called, for messages.
struct ClientTlsKeys {
    url: &'static str,
    ca_file: &'static str,
    client_cert: &'static str,
    client_key: &'static str,
    server: &'static str,
}

const UPSTREAM_TLS_KEYS: ClientTlsKeys = ClientTlsKeys {
    url: "upstream.url",
    ca_file: "upstream.ca_file",
    client_cert: "upstream.client_cert",
    client_key: "upstream.client_key",
    server: "the aggregator",
};

const MQTT_TLS_KEYS: ClientTlsKeys = ClientTlsKeys {
    url: "mqtt.url",
    ca_file: "mqtt.ca_file",
    client_cert: "mqtt.client_cert",
    client_key: "mqtt.client_key",
    server: "the MQTT broker",
};

/// A client's TLS files, as configured (relative to the configuration file).
struct ClientTlsFiles<'a> {
    ca_file: Option<&'a Path>,
    client_cert: Option<&'a Path>,
    client_key: Option<&'a Path>,
}

/// A TLS client's settings: trusting only `ca_file` if set (else the system's CA certificates),
/// showing `client_cert` if set. `scheme` is the url's, for messages.
fn client_tls(
    keys: &ClientTlsKeys,
    scheme: &str,
    files: &ClientTlsFiles<'_>,
    file: &Path,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    // Explicitly ring, as everywhere in the agent: `--check-config` runs before main installs it.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| (keys.url, format!("no TLS version to offer: {e}")))?;
    let builder = match files.ca_file {
        Some(ca_file) => builder.with_root_certificates(read_roots(keys.ca_file, &relative_to(file, ca_file))?),
        None => {
            // As reqwest does by default: the system's CA certificates, read once, here.
            let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(|e| {
                (
                    keys.ca_file,
                    format!(
                        "{} is {scheme}:// but this system has no CA certificates to check {}'s with ({e}): set \
                         ca_file to the PEM file of the CA that signed it (or install the system's CA \
                         certificates, e.g. the ca-certificates package)",
                        keys.url, keys.server
                    ),
                )
            })?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
        }
    };
    match (files.client_cert, files.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err((keys.client_key, "required with client_cert: the PEM file of its private key".into())),
        (None, Some(_)) => {
            Err((keys.client_cert, "required with client_key: the PEM file of the agent's certificate".into()))
        }
        (Some(cert), Some(key)) => {
            let (cert, key) = (relative_to(file, cert), relative_to(file, key));
            let chain = read_certificates(keys.client_cert, &cert)?;
            let key_der = read_private_key(keys.client_key, &key)?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| (keys.client_key, key_mismatch(e, &key, &cert)))
        }
    }
}

/// Resolves one secret: reads `from_file` (relative to the configuration file `file`, whitespace
/// trimmed) into `value`, then replaces `${NAME}` in it. `keys` are the value's and the file's keys,
/// `at` prefixes messages (which entry of a list).
fn resolve_secret(
    value: &mut String,
    from_file: Option<&Path>,
    file: &Path,
    keys: (&'static str, &'static str),
    at: &str,
) -> Result<(), (&'static str, String)> {
    let short = |key: &'static str| key.rsplit('.').next().unwrap_or(key);
    if let Some(from_file) = from_file {
        if !value.is_empty() {
            return Err((keys.1, format!("{at}set `{}` or `{}`, not both", short(keys.0), short(keys.1))));
        }
        let path = file.parent().map_or_else(|| from_file.to_path_buf(), |dir| dir.join(from_file));
        let text =
            std::fs::read_to_string(&path).map_err(|e| (keys.1, format!("{at}cannot read {}: {e}", path.display())))?;
        *value = text.trim().to_string();
        if value.is_empty() {
            return Err((keys.1, format!("{at}{} is empty", path.display())));
        }
    }
    *value = expand_env(value).map_err(|e| (keys.0, format!("{at}{e}")))?;
    Ok(())
}

/// Replaces every `${NAME}` by the environment variable NAME; a variable that is not set is an
/// error naming it.
fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("`${{` without a closing `}}` in {text:?}"))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| format!("the environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
agent_id = "gw-1"
data_dir = "/tmp/x"
[upstream]
url = "http://127.0.0.1:8080"
token = "t"
"#;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/agent.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_token_can_come_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "  from-a-file\n").unwrap();
        let file = dir.path().join("agent.toml");
        let with_file = MINIMAL.replace("token = \"t\"", "token_file = \"token\"");
        assert_eq!(Config::parse(&with_file, &file).unwrap().upstream.token, "from-a-file");
        let both = MINIMAL.replace("token = \"t\"", "token = \"t\"\ntoken_file = \"token\"");
        assert!(Config::parse(&both, &file).unwrap_err().to_string().contains("not both"));
        let missing = MINIMAL.replace("token = \"t\"", "token_file = \"nope\"");
        assert!(Config::parse(&missing, &file).unwrap_err().to_string().contains("cannot read"));
        // SAFETY: a variable no other test reads, set before it is read.
        unsafe { std::env::set_var("TRIBUTARY_TEST_TOKEN_A", "from-env") };
        let with_env = MINIMAL.replace("token = \"t\"", "token = \"${TRIBUTARY_TEST_TOKEN_A}\"");
        assert_eq!(parse(&with_env).unwrap().upstream.token, "from-env");
        let unset = MINIMAL.replace("token = \"t\"", "token = \"${TRIBUTARY_TEST_TOKEN_UNSET}\"");
        assert!(parse(&unset).unwrap_err().contains("TRIBUTARY_TEST_TOKEN_UNSET is not set"));
    }

    #[test]
    fn the_example_file_parses_to_the_documented_defaults() {
        let example = parse(EXAMPLE).unwrap();
        let minimal = parse(MINIMAL).unwrap();
        assert_eq!(example.http.listen, minimal.http.listen);
        assert_eq!(example.mqtt.mode, MqttMode::Embedded);
        assert_eq!(example.mqtt.topics, minimal.mqtt.topics);
        assert_eq!(example.mqtt.max_payload_bytes, minimal.mqtt.max_payload_bytes);
        assert_eq!(example.mqtt.broker_buffer_bytes, minimal.mqtt.broker_buffer_bytes);
        assert_eq!(example.spool.commit_interval, minimal.spool.commit_interval);
        assert_eq!(example.spool.gather_interval, minimal.spool.gather_interval);
        assert_eq!(minimal.spool.gather_interval, Duration::from_millis(25));
        assert_eq!(example.spool.max_queued_readings, minimal.spool.max_queued_readings);
        assert_eq!(example.validation.max_clock_skew, Duration::from_secs(300));
        assert_eq!(example.mqtt.max_readings_per_message, minimal.mqtt.max_readings_per_message);
        assert_eq!(example.validation.max_new_sensors_per_minute, minimal.validation.max_new_sensors_per_minute);
        assert_eq!(example.upstream.batch_max_readings, minimal.upstream.batch_max_readings);
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = parse(&MINIMAL.replace("token = \"t\"", "token = \"t\"\ntokn = 1")).unwrap_err();
        assert!(e.starts_with("/etc/agent.toml:7:1: upstream.tokn: unknown field `tokn`, expected one of"), "{e}");
        let e = parse(&MINIMAL.replace("agent_id = \"gw-1\"", "")).unwrap_err();
        assert!(e.contains("/etc/agent.toml") && e.contains("missing field `agent_id`"), "{e}");
        let e = parse(&format!("{MINIMAL}[mqtt]\nmode = \"bridge\"\n")).unwrap_err();
        assert!(e.contains("mqtt.mode") && e.contains("unknown variant `bridge`"), "{e}");
        let e = parse(&format!("{MINIMAL}[http]\nlisten = \"nope\"\n")).unwrap_err();
        assert!(e.contains("http.listen") && e.contains("invalid socket address"), "{e}");
        let e = parse(&format!("{MINIMAL}[mqtt]\nmode = \"client\"\n")).unwrap_err();
        assert!(e.contains("mqtt.url: required when mqtt.mode = \"client\""), "{e}");
        let e = parse(&format!("{MINIMAL}[spool]\ncommit_interval = \"5 parsecs\"\n")).unwrap_err();
        assert!(e.contains("spool.commit_interval"), "{e}");
        let e = parse(&format!("{MINIMAL}[spool]\noverflow = \"drop_middle\"\n")).unwrap_err();
        assert!(e.contains("spool.overflow") && e.contains("drop_oldest"), "{e}");
    }

    #[test]
    fn an_upstream_url_with_a_path_keeps_it() {
        for (url, ingest) in [
            ("http://host/tributary", "http://host/tributary/api/v1/ingest"),
            ("http://host/tributary/", "http://host/tributary/api/v1/ingest"),
            ("http://host:8080", "http://host:8080/api/v1/ingest"),
            ("https://host/a/b", "https://host/a/b/api/v1/ingest"),
        ] {
            let config = parse(&MINIMAL.replace("http://127.0.0.1:8080", url)).unwrap();
            assert_eq!(config.upstream.ingest_url().unwrap().as_str(), ingest, "{url}");
        }
    }

    #[test]
    fn max_age_is_a_duration_and_off_by_default() {
        assert_eq!(parse(MINIMAL).unwrap().spool.max_age, None);
        let week = parse(&format!("{MINIMAL}[spool]\nmax_age = \"7d\"\n")).unwrap();
        assert_eq!(week.spool.max_age, Some(Duration::from_secs(7 * 86_400)));
        let e = parse(&format!("{MINIMAL}[spool]\nmax_age = \"a week\"\n")).unwrap_err();
        assert!(e.contains("max_age"), "{e}");
    }

    #[test]
    fn idle_commits_and_syncs_are_bounded_and_documented_with_their_defaults() {
        let (example, minimal) = (parse(EXAMPLE).unwrap().spool, parse(MINIMAL).unwrap().spool);
        assert_eq!(minimal.max_commit_interval, Duration::from_secs(4));
        assert_eq!(minimal.sync_interval, Duration::from_secs(30));
        assert_eq!(
            (example.max_commit_interval, example.sync_interval),
            (minimal.max_commit_interval, minimal.sync_interval)
        );
        assert_eq!(example.sync, minimal.sync);
        let old = parse(&format!("{MINIMAL}[spool]\nmax_commit_interval = \"5ms\"\nsync_interval = \"0s\"\n")).unwrap();
        assert_eq!(
            (old.spool.max_commit_interval, old.spool.sync_interval),
            (old.spool.commit_interval, Duration::ZERO)
        );
        for (spool, key) in [
            (
                "commit_interval = \"1s\"\nmax_commit_interval = \"500ms\"",
                "spool.max_commit_interval: must be at least",
            ),
            ("max_commit_interval = \"2m\"", "spool.max_commit_interval: at most 60s"),
            ("gather_interval = \"2s\"", "spool.gather_interval: at most 1s"),
            ("gather_interval = \"later\"", "spool.gather_interval"),
            ("sync_interval = \"2h\"", "spool.sync_interval: at most 1h"),
            ("sync_interval = \"soon\"", "spool.sync_interval"),
        ] {
            let e = parse(&format!("{MINIMAL}[spool]\n{spool}\n")).unwrap_err();
            assert!(e.contains(key), "{spool}: {e}");
        }
    }

    /// `dir/tls/ca.pem`, and `dir/tls/client.pem` with its key `client.key`, signed by that CA.
    fn write_certificates(dir: &Path) {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gw-1".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
        std::fs::write(tls.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(tls.join("client.pem"), cert.pem()).unwrap();
        std::fs::write(tls.join("client.key"), key.serialize_pem()).unwrap();
    }

    #[test]
    fn tls_files_are_read_at_load_relative_to_the_configuration_file() {
        let dir = tempfile::tempdir().unwrap();
        write_certificates(dir.path());
        let file = dir.path().join("agent.toml");
        let https = MINIMAL.replace("http://127.0.0.1:8080", "https://aggregator.example:8443");
        let with =
            |keys: &str| Config::parse(&https.replace("token = \"t\"", &format!("token = \"t\"\n{keys}")), &file);
        let config =
            with("ca_file = \"tls/ca.pem\"\nclient_cert = \"tls/client.pem\"\nclient_key = \"tls/client.key\"")
                .unwrap();
        let tls = config.upstream.tls.expect("TLS settings for an https url").0;
        assert!(tls.client_auth_cert_resolver.has_certs(), "the client certificate is offered");
        assert_eq!(tls.alpn_protocols, [b"http/1.1".to_vec()]);
        let config = with("ca_file = \"tls/ca.pem\"").unwrap();
        assert!(!config.upstream.tls.expect("TLS settings").0.client_auth_cert_resolver.has_certs());
        assert!(parse(MINIMAL).unwrap().upstream.tls.is_none(), "none for http");

        let error = |keys: &str| with(keys).unwrap_err().to_string();
        let e = error("ca_file = \"tls/ca.pem\"\nclient_cert = \"tls/client.pem\"");
        assert!(e.contains("upstream.client_key: required with client_cert"), "{e}");
        let e = error("client_key = \"tls/client.key\"");
        assert!(e.contains("upstream.client_cert: required with client_key"), "{e}");
        let e = error("ca_file = \"tls/nope.pem\"");
        let missing = dir.path().join("tls/nope.pem");
        assert!(e.contains("upstream.ca_file: cannot read") && e.contains(&missing.display().to_string()), "{e}");
        let e = error("ca_file = \"tls/client.key\"");
        assert!(e.contains("upstream.ca_file") && e.contains("holds no certificate"), "{e}");
        let e = error("client_cert = \"tls/client.pem\"\nclient_key = \"tls/ca.pem\"");
        assert!(e.contains("upstream.client_key") && e.contains("holds no private key"), "{e}");
        let e = Config::parse(&MINIMAL.replace("token = \"t\"", "token = \"t\"\nca_file = \"tls/ca.pem\""), &file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstream.ca_file: TLS needs an https:// upstream.url"), "{e}");
    }

    #[test]
    fn mqtt_tls_files_are_read_at_load_and_each_modes_keys_refused_in_the_other() {
        let dir = tempfile::tempdir().unwrap();
        write_certificates(dir.path());
        let file = dir.path().join("agent.toml");
        let mqtt = |keys: &str| Config::parse(&format!("{MINIMAL}[mqtt]\n{keys}\n"), &file);
        let error = |keys: &str| mqtt(keys).unwrap_err().to_string();

        // The embedded broker's TLS listener.
        let server = "tls_listen = \"127.0.0.1:8883\"\ntls_cert = \"tls/client.pem\"\ntls_key = \"tls/client.key\"";
        let config = mqtt(server).unwrap();
        assert!(matches!(config.mqtt.tls, Some(MqttTls::Server(_))), "{:?}", config.mqtt.tls);
        let config = mqtt(&format!("{server}\ntls_client_ca = \"tls/ca.pem\"")).unwrap();
        assert!(matches!(config.mqtt.tls, Some(MqttTls::Server(_))));
        assert!(parse(MINIMAL).unwrap().mqtt.tls.is_none(), "no TLS by default");
        let e = error("tls_cert = \"tls/client.pem\"\ntls_key = \"tls/client.key\"");
        assert!(e.contains("mqtt.tls_listen: required with tls_cert"), "{e}");
        let e = error("tls_listen = \"127.0.0.1:8883\"\ntls_cert = \"tls/client.pem\"");
        assert!(e.contains("mqtt.tls_key: required with tls_listen"), "{e}");
        let e = error("tls_listen = \"127.0.0.1:1883\"\ntls_cert = \"tls/client.pem\"\ntls_key = \"tls/client.key\"");
        assert!(e.contains("mqtt.tls_listen: 127.0.0.1:1883 is mqtt.listen's address too"), "{e}");
        let e = error(&format!("{server}\ntls_client_ca = \"tls/none.pem\""));
        assert!(e.contains("mqtt.tls_client_ca: cannot read") && e.contains("none.pem"), "{e}");
        let e = error(&server.replace("tls/client.key", "tls/ca.pem"));
        assert!(e.contains("mqtt.tls_key") && e.contains("holds no private key"), "{e}");
        let e = error("ca_file = \"tls/ca.pem\"");
        assert!(e.contains("mqtt.ca_file: is how the agent checks a broker it joins in client mode"), "{e}");

        // Client mode: mqtts:// with the agent's own files.
        let client = "mode = \"client\"\nurl = \"mqtts://broker.example\"";
        let config = mqtt(&format!(
            "{client}\nca_file = \"tls/ca.pem\"\nclient_cert = \"tls/client.pem\"\nclient_key = \"tls/client.key\""
        ))
        .unwrap();
        let Some(MqttTls::Client(tls)) = &config.mqtt.tls else { panic!("{:?}", config.mqtt.tls) };
        assert!(tls.client_auth_cert_resolver.has_certs(), "the client certificate is offered");
        let e = error(&format!("{client}\nca_file = \"tls/nope.pem\""));
        assert!(e.contains("mqtt.ca_file: cannot read") && e.contains("nope.pem"), "{e}");
        let e = error(&format!("{client}\nclient_cert = \"tls/client.pem\""));
        assert!(e.contains("mqtt.client_key: required with client_cert"), "{e}");
        let e = error("mode = \"client\"\nurl = \"mqtt://broker.example\"\nca_file = \"tls/ca.pem\"");
        assert!(e.contains("mqtt.ca_file: TLS needs an mqtts:// mqtt.url (e.g. mqtts://broker.example:8883)"), "{e}");
        let e = error(&format!("{client}\ntls_listen = \"127.0.0.1:8883\""));
        assert!(e.contains("mqtt.tls_listen: only the embedded broker listens"), "{e}");
        let e = error("mode = \"client\"\nurl = \"https://broker.example\"");
        assert!(e.contains("expected mqtt://host:port or mqtts://host:port"), "{e}");
    }

    #[test]
    fn broker_users_take_passwords_inline_from_files_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dev-2.pw"), "file-secret\n").unwrap();
        let file = dir.path().join("agent.toml");
        // SAFETY: a variable no other test reads, set before it is read.
        unsafe { std::env::set_var("TRIBUTARY_TEST_MQTT_PW", "env-secret") };
        let text = format!(
            "{MINIMAL}[[mqtt.users]]\nusername = \"dev-1\"\npassword = \"inline\"\n\
             [[mqtt.users]]\nusername = \"dev-2\"\npassword_file = \"dev-2.pw\"\n\
             [[mqtt.users]]\nusername = \"dev-3\"\npassword = \"${{TRIBUTARY_TEST_MQTT_PW}}\"\n"
        );
        let users = Config::parse(&text, &file).unwrap().mqtt.users;
        let pairs: Vec<_> = users.iter().map(|u| (u.username.as_str(), u.password.as_str())).collect();
        assert_eq!(pairs, [("dev-1", "inline"), ("dev-2", "file-secret"), ("dev-3", "env-secret")]);
        let inline = format!("{MINIMAL}[mqtt]\nusers = [{{ username = \"a\", password = \"b\" }}]\n");
        assert_eq!(parse(&inline).unwrap().mqtt.users[0].password, "b");
        assert!(parse(MINIMAL).unwrap().mqtt.users.is_empty(), "open by default");

        let error = |users: &str| Config::parse(&format!("{MINIMAL}{users}"), &file).unwrap_err().to_string();
        let e = error("[[mqtt.users]]\nusername = \"dev-1\"\npassword_file = \"nope\"\n");
        assert!(e.contains("mqtt.users.password_file: [[mqtt.users]] #1 (\"dev-1\"): cannot read"), "{e}");
        let e = error("[[mqtt.users]]\nusername = \"dev-1\"\n");
        assert!(e.contains("mqtt.users.password: [[mqtt.users]] #1 (\"dev-1\"): required"), "{e}");
        let e = error(
            "[[mqtt.users]]\nusername = \"d\"\npassword = \"1\"\n[[mqtt.users]]\nusername = \"d\"\npassword = \"2\"\n",
        );
        assert!(e.contains("mqtt.users.username: [[mqtt.users]] #2: \"d\" is listed twice"), "{e}");
        let e = error("[[mqtt.users]]\nusername = \"d\"\npassword = \"x\"\npassword_file = \"dev-2.pw\"\n");
        assert!(e.contains("set `password` or `password_file`, not both"), "{e}");
        let e = error("[[mqtt.users]]\nusername = \"d\"\npasswd = \"x\"\n");
        assert!(e.contains("unknown field `passwd`"), "{e}");
        let e = error(
            "[mqtt]\nmode = \"client\"\nurl = \"mqtt://h\"\n[[mqtt.users]]\nusername = \"d\"\npassword = \"x\"\n",
        );
        assert!(e.contains("mqtt.users: only the embedded broker has users"), "{e}");
    }

    #[test]
    fn client_credentials_need_a_username_and_a_readable_password_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mqtt.pw"), " s3cret \n").unwrap();
        let file = dir.path().join("agent.toml");
        let client = format!("{MINIMAL}[mqtt]\nmode = \"client\"\nurl = \"mqtt://broker:1883\"\n");
        let with = |keys: &str| Config::parse(&format!("{client}{keys}\n"), &file);
        let config = with("username = \"gw\"\npassword_file = \"mqtt.pw\"").unwrap();
        assert_eq!((config.mqtt.username.as_deref(), config.mqtt.password.as_str()), (Some("gw"), "s3cret"));
        // SAFETY: a variable no other test reads, set before it is read.
        unsafe { std::env::set_var("TRIBUTARY_TEST_MQTT_CLIENT_PW", "from-env") };
        let config = with("username = \"gw\"\npassword = \"${TRIBUTARY_TEST_MQTT_CLIENT_PW}\"").unwrap();
        assert_eq!(config.mqtt.password, "from-env");

        let error = |keys: &str| with(keys).unwrap_err().to_string();
        let e = error("password = \"s3cret\"");
        assert!(e.contains("mqtt.password: set without mqtt.username"), "{e}");
        let e = error("password_file = \"mqtt.pw\"");
        assert!(e.contains("mqtt.password: set without mqtt.username"), "{e}");
        let e = error("username = \"gw\"\npassword_file = \"missing.pw\"");
        assert!(e.contains("mqtt.password_file: cannot read") && e.contains("missing.pw"), "{e}");
        let e = error("username = \"gw\"\npassword = \"${TRIBUTARY_TEST_MQTT_UNSET}\"");
        assert!(e.contains("mqtt.password: the environment variable TRIBUTARY_TEST_MQTT_UNSET is not set"), "{e}");
        let e = Config::parse(&format!("{MINIMAL}[mqtt]\nusername = \"gw\"\n"), &file).unwrap_err().to_string();
        assert!(e.contains("mqtt.username: is how the agent logs in to a broker in client mode"), "{e}");
        let e = Config::parse(&(client.replace("mqtt://broker", "mqtt://u:p@broker") + "username = \"gw\"\n"), &file)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn overflow_defaults_to_dropping_the_oldest() {
        assert_eq!(parse(MINIMAL).unwrap().spool.overflow, Overflow::DropOldest);
        assert_eq!(parse(EXAMPLE).unwrap().spool.overflow, Overflow::DropOldest);
        let newest = parse(&format!("{MINIMAL}[spool]\noverflow = \"drop_newest\"\n")).unwrap();
        assert_eq!(newest.spool.overflow, Overflow::DropNewest);
    }
}
