//! The aggregator's TOML configuration: what it reads at start and how it says what is wrong.
//!
//! Every struct denies unknown keys, so a typo stops the process instead of silently falling back
//! to a default. Errors name the file, the key and the reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tributary_shared::config_file;

/// The commented example configuration, printed by `generate-config`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../deploy/aggregator.toml");

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory holding the log (`log.db`) and the serving store (`store.db`). Required; created if
    /// missing.
    pub data_dir: PathBuf,
    /// The HTTP server. Default: see [`HttpConfig`].
    #[serde(default)]
    pub http: HttpConfig,
    /// The agents allowed to ingest. Required, at least one.
    pub agents: Vec<AgentConfig>,
    /// The stream processing. Default: see [`PipelineConfig`].
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Anomaly models per sensor glob (`[[anomaly]]`); the first matching entry wins. Default: none.
    #[serde(default)]
    pub anomaly: Vec<AnomalyConfig>,
    /// Alert rules (`[[alerts]]`). Default: none.
    #[serde(default)]
    pub alerts: Vec<AlertConfig>,
    /// Webhooks every alert transition is POSTed to (`[[notify]]`). Default: none.
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
    /// The log. Default: see [`LogConfig`].
    #[serde(default)]
    pub log: LogConfig,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// How much of the log to keep: an age (`"30d"`, by the time blocks were received) or a size
    /// (`"50GB"`, `"500MiB"`); the oldest blocks go first, and only blocks the serving pipeline
    /// has processed. Dropped ranges are recorded (`log stats`). Default: none (keep everything).
    pub retain: Option<String>,
}

/// `[log] retain`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retain {
    Age(Duration),
    Bytes(u64),
}

/// Parses `[log] retain`: a size with a unit (`B`, `kB`, `MB`, `GB`, `TB`, `KiB`, `MiB`, `GiB`,
/// `TiB`) or a duration (`30d`, `12h`).
pub fn parse_retain(text: &str) -> Result<Retain, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim());
    let scale = match unit {
        "B" => Some(1.0),
        "kB" | "KB" => Some(1e3),
        "MB" => Some(1e6),
        "GB" => Some(1e9),
        "TB" => Some(1e12),
        "KiB" => Some(1024.0),
        "MiB" => Some(1024.0 * 1024.0),
        "GiB" => Some(1024.0 * 1024.0 * 1024.0),
        "TiB" => Some(1024.0 * 1024.0 * 1024.0 * 1024.0),
        _ => None,
    };
    if let Some(scale) = scale {
        let bytes = number.parse::<f64>().map(|n| n * scale).unwrap_or(f64::NAN);
        if !(1024.0 * 1024.0..1e18).contains(&bytes) {
            return Err(format!("{text:?}: a size must be from 1MiB to 1000PB, e.g. \"50GB\""));
        }
        return Ok(Retain::Bytes(bytes as u64));
    }
    let age = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is neither a size like \"50GB\" nor an age like \"30d\": {e}"))?;
    if age < Duration::from_secs(1) {
        return Err(format!("{text:?}: an age must be at least 1s"));
    }
    Ok(Retain::Age(age))
}

/// `[[anomaly]]`: an anomaly model for the sensors matching `sensor`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalyConfig {
    /// Sensor id glob. Required.
    pub sensor: String,
    /// `mad` (rolling median / median absolute deviation, robust to outliers; default) or `ewma`.
    #[serde(default = "default_model")]
    pub model: crate::pipeline::anomaly::ModelKind,
    /// Score (distance from the expected value in robust standard deviations) above which a
    /// reading is an anomaly. Default 4.
    #[serde(default = "default_anomaly_threshold")]
    pub threshold: f64,
    /// Readings a sensor's model learns from before it scores any. Default 30.
    #[serde(default = "default_warmup")]
    pub warmup: u32,
    /// Readings the model looks back over (the MAD window; the EWMA span). Default 60.
    #[serde(default = "default_model_window")]
    pub window: u32,
}

/// `[[alerts]]`: one alert rule. Exactly one condition: `above`, `below`, `rate_above`,
/// `rate_below`, `anomaly = true` or `stale`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// The rule's name, unique. Required.
    pub name: String,
    /// Sensor id glob. Required.
    pub sensor: String,
    /// Fires when the value is above this...
    pub above: Option<f64>,
    /// ...or below this.
    pub below: Option<f64>,
    /// Fires when the value changes faster than this per second (upwards)...
    pub rate_above: Option<f64>,
    /// ...or slower than this per second (e.g. `-2.0` for a drop of more than 2 per second).
    pub rate_below: Option<f64>,
    /// Fires when the sensor's anomaly model flags a reading; resolves on the next normal one.
    pub anomaly: Option<bool>,
    /// Fires when the sensor has sent nothing for this long (processing time), e.g. `"10m"`.
    #[serde(default, with = "humantime_serde::option")]
    pub stale: Option<Duration>,
    /// How long (event time) the condition must hold before the alert fires. Default `0s`.
    #[serde(rename = "for", default, with = "humantime_serde")]
    pub for_: Duration,
    /// Hysteresis: an `above`/`below` alert resolves only once the value is back past this.
    /// Default: the threshold itself.
    pub clear: Option<f64>,
    /// `info`, `warning` (default) or `critical`.
    #[serde(default = "default_severity")]
    pub severity: String,
}

/// `[[notify]]`: a webhook.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Where alert transitions are POSTed as JSON. Required.
    pub url: url::Url,
    /// Time limit of one delivery attempt. Default 10 s.
    #[serde(default = "default_notify_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Delivery attempts (with backoff) before a notification is given up. Default 8.
    #[serde(default = "default_notify_attempts")]
    pub attempts: u32,
}

fn default_model() -> crate::pipeline::anomaly::ModelKind {
    crate::pipeline::anomaly::ModelKind::Mad
}
fn default_anomaly_threshold() -> f64 {
    4.0
}
fn default_warmup() -> u32 {
    30
}
fn default_model_window() -> u32 {
    60
}
fn default_severity() -> String {
    "warning".into()
}
fn default_notify_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_notify_attempts() -> u32 {
    8
}

/// `[pipeline]`: what the processor computes from the log.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Tumbling window sizes precomputed by event time, each a whole number of seconds.
    /// `GET .../windows?size=` serves these and any whole multiple of one of them.
    /// Default `["10s", "1m", "1h"]`.
    #[serde(default = "default_windows")]
    pub windows: Vec<String>,
    /// Calendar-day windows in an IANA time zone, e.g. `days = { tz = "Europe/Berlin" }`
    /// (served as `size=day`). Default: none.
    pub days: Option<DaysConfig>,
    /// Readings stamped further ahead than this of the time the aggregator received them are
    /// quarantined (`GET /api/v1/quarantine`), never folded in. Default 5 minutes.
    #[serde(default = "default_max_clock_skew", with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// A sensor not heard from for this long is shown as `stale`. Default 5 minutes.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// Per-sensor exceptions to `stale_after`: `[[pipeline.stale]] sensor = "meters/*"`,
    /// `after = "1h"`; the first matching entry wins. Default: none.
    #[serde(default)]
    pub stale: Vec<StaleOverride>,
    /// The processing version. Everything the pipeline computes is stored under it; raising it
    /// (with new windows, rules or models) and restarting replays the log from offset 0 into the
    /// new version's tables in the background, while the API serves the old version, and switches
    /// to the new one once it has caught up. Changing what the pipeline computes without raising
    /// it is refused at start. Default 1.
    #[serde(default = "default_version")]
    pub version: u32,
    /// How long a replaced version's tables are kept for `tributary-aggregator pipeline rollback`.
    /// Default 24 hours.
    #[serde(default = "default_keep_previous", with = "humantime_serde")]
    pub keep_previous: Duration,
}

/// `[pipeline] days = { tz = "..." }`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaysConfig {
    /// IANA time zone name, e.g. `Europe/Berlin`. Required.
    pub tz: String,
}

/// `[[pipeline.stale]]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaleOverride {
    /// Sensor id glob (`*` within a level, `**` across levels). Required.
    pub sensor: String,
    /// Staleness threshold for the matching sensors. Required.
    #[serde(with = "humantime_serde")]
    pub after: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            windows: default_windows(),
            days: None,
            max_clock_skew: default_max_clock_skew(),
            stale_after: default_stale_after(),
            stale: Vec::new(),
            version: default_version(),
            keep_previous: default_keep_previous(),
        }
    }
}

fn default_windows() -> Vec<String> {
    vec!["10s".into(), "1m".into(), "1h".into()]
}

fn default_max_clock_skew() -> Duration {
    Duration::from_secs(300)
}

fn default_stale_after() -> Duration {
    Duration::from_secs(300)
}

fn default_version() -> u32 {
    1
}

fn default_keep_previous() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Parses a window size: a duration that is a whole number of seconds, at least one.
pub fn parse_window_size(text: &str) -> Result<i64, String> {
    let size = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 10s, 1m, 1h: {e}"))?;
    if size.as_secs() == 0 || size.subsec_nanos() != 0 {
        return Err(format!("{text:?} must be a whole number of seconds, at least 1s"));
    }
    if size > Duration::from_secs(366 * 86_400) {
        return Err(format!("{text:?} is longer than a year"));
    }
    Ok(size.as_millis() as i64)
}

/// A sensor id glob: `*` matches within one `/`-separated level, `**` across levels.
pub fn parse_glob(text: &str) -> Result<globset::GlobMatcher, String> {
    globset::GlobBuilder::new(text)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("{text:?} is not a sensor glob: {e}"))
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on for ingest, the dashboard API, `/healthz` and `/metrics`.
    /// Default: `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// When set, reading (the page, `/api/v1/*` but ingest, `/prometheus/*`) needs this token:
    /// `Authorization: Bearer <token>`, or the cookie the page sets after `/?token=<token>`.
    /// Agents' ingest tokens do not read, and this token does not ingest. `/healthz` and
    /// `/metrics` stay open (load balancers and Prometheus). Default: none (reading is open).
    #[serde(default)]
    pub read_token: Option<String>,
    /// Origins (`https://grafana.example.com`) whose pages may call the read API from a browser
    /// (CORS). `["*"]` allows any origin. Default: none (same origin only).
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Serve HTTPS on `listen` with this certificate (PEM; intermediates after it), relative to
    /// the configuration file. Set with `tls_key`. Default: none (plain HTTP).
    pub tls_cert: Option<PathBuf>,
    /// The private key of `tls_cert` (PEM: PKCS#8, PKCS#1 or SEC1), relative to the configuration
    /// file. Default: none.
    pub tls_key: Option<PathBuf>,
    /// With HTTPS: every client (agents, browsers, Prometheus, load balancers' health checks) must
    /// present a certificate signed by one of the CAs in this PEM file, relative to the
    /// configuration file. Default: none (no client certificate asked for).
    pub tls_client_ca: Option<PathBuf>,
    /// Most clients following `/api/v1/stream` at once (the dashboard's open pages); one more
    /// gets 503 until one leaves. Each holds a connection (a file descriptor) and a task. 0 turns
    /// the stream off. Default: 1,000.
    #[serde(default = "default_max_stream_clients")]
    pub max_stream_clients: usize,
}

fn default_max_stream_clients() -> usize {
    crate::live::DEFAULT_MAX_CLIENTS
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            read_token: None,
            cors_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            max_stream_clients: default_max_stream_clients(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// `[[agents]]`: one agent allowed to ingest.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent id, as the agent puts it in its batches. Required, unique.
    pub id: String,
    /// Bearer token the agent authenticates with. Required, non-empty, unique (a token shared by
    /// two agents would authenticate only the first, and the other would get 403 for ever), no
    /// spaces or control characters (an `Authorization` header could never carry it).
    pub token: String,
}

// Tokens are secrets: keep them out of debug logs.
impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig").field("id", &self.id).field("token", &"<redacted>").finish()
    }
}

pub use tributary_shared::config_file::ConfigError;

impl Config {
    /// Every default, listening on a loopback port the system picks, for `agents`: for benchmarks
    /// and for running the aggregator inside another program.
    pub fn loopback(data_dir: &Path, agents: Vec<AgentConfig>) -> Config {
        Config {
            data_dir: data_dir.to_path_buf(),
            http: HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..HttpConfig::default() },
            agents,
            pipeline: PipelineConfig::default(),
            anomaly: Vec::new(),
            alerts: Vec::new(),
            notify: Vec::new(),
            log: LogConfig::default(),
        }
    }

    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = config_file::load(path)?;
        config.resolve_paths(path);
        config.check(path)?;
        Ok(config)
    }

    /// Parses and checks configuration text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = config_file::parse(text, path)?;
        config.resolve_paths(path);
        config.check(path)?;
        Ok(config)
    }

    /// The TLS files are named relative to the configuration file (as the agent's are), so that
    /// they can sit beside it whatever the working directory.
    fn resolve_paths(&mut self, path: &Path) {
        let Some(dir) = path.parent() else { return };
        for file in
            [&mut self.http.tls_cert, &mut self.http.tls_key, &mut self.http.tls_client_ca].into_iter().flatten()
        {
            *file = dir.join(&*file);
        }
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::invalid(path, key, reason);
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir".into(), "must not be empty".into()));
        }
        if self.agents.is_empty() {
            return Err(invalid(
                "agents".into(),
                "at least one [[agents]] entry is needed, or nothing can ingest".into(),
            ));
        }
        let mut sizes = Vec::new();
        for (i, text) in self.pipeline.windows.iter().enumerate() {
            let size = parse_window_size(text).map_err(|e| invalid(format!("pipeline.windows[{i}]"), e))?;
            if sizes.contains(&size) {
                return Err(invalid(format!("pipeline.windows[{i}]"), format!("{text:?} is listed twice")));
            }
            sizes.push(size);
        }
        if self.pipeline.windows.is_empty() && self.pipeline.days.is_none() {
            return Err(invalid("pipeline.windows".into(), "at least one window size is needed".into()));
        }
        if let Some(days) = &self.pipeline.days {
            crate::pipeline::calendar::Calendar::days(&days.tz).map_err(|e| invalid("pipeline.days.tz".into(), e))?;
        }
        if let Some(retain) = &self.log.retain {
            parse_retain(retain).map_err(|e| invalid("log.retain".into(), e))?;
        }
        if self.pipeline.version == 0 || self.pipeline.version > crate::versions::MAX_VERSION {
            return Err(invalid(
                "pipeline.version".into(),
                format!("must be from 1 to {}", crate::versions::MAX_VERSION),
            ));
        }
        for (i, stale) in self.pipeline.stale.iter().enumerate() {
            parse_glob(&stale.sensor).map_err(|e| invalid(format!("pipeline.stale[{i}].sensor"), e))?;
        }
        for (i, a) in self.anomaly.iter().enumerate() {
            parse_glob(&a.sensor).map_err(|e| invalid(format!("anomaly[{i}].sensor"), e))?;
            if !(a.threshold.is_finite() && a.threshold > 0.0) {
                return Err(invalid(format!("anomaly[{i}].threshold"), "must be a positive number".into()));
            }
            if a.window < 3 || a.window > 10_000 {
                return Err(invalid(format!("anomaly[{i}].window"), "must be from 3 to 10000 readings".into()));
            }
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, a) in self.alerts.iter().enumerate() {
            let key = |k: &str| format!("alerts[{i}].{k}");
            if a.name.is_empty() || a.name.contains(['/', '#', '+']) || a.name.chars().any(char::is_control) {
                return Err(invalid(key("name"), "must be a non-empty name without '/', '#', '+'".into()));
            }
            if let Some(first) = names.insert(&a.name, i) {
                return Err(invalid(
                    key("name"),
                    format!("duplicate rule name `{}` (already alerts[{first}])", a.name),
                ));
            }
            parse_glob(&a.sensor).map_err(|e| invalid(key("sensor"), e))?;
            let conditions = [
                a.above.is_some(),
                a.below.is_some(),
                a.rate_above.is_some(),
                a.rate_below.is_some(),
                a.anomaly == Some(true),
                a.stale.is_some(),
            ];
            if conditions.iter().filter(|c| **c).count() != 1 {
                return Err(invalid(
                    format!("alerts[{i}]"),
                    "needs exactly one condition: above, below, rate_above, rate_below, anomaly = true or stale".into(),
                ));
            }
            for (k, v) in [
                ("above", a.above),
                ("below", a.below),
                ("rate_above", a.rate_above),
                ("rate_below", a.rate_below),
                ("clear", a.clear),
            ] {
                if v.is_some_and(|v| !v.is_finite()) {
                    return Err(invalid(key(k), "must be a finite number".into()));
                }
            }
            if a.stale.is_some_and(|d| d.is_zero()) {
                // Zero would fire for every sensor between two readings.
                return Err(invalid(key("stale"), "must be longer than 0s, e.g. \"10m\"".into()));
            }
            if a.clear.is_some() && a.above.is_none() && a.below.is_none() {
                return Err(invalid(key("clear"), "only applies to `above` and `below`".into()));
            }
            match (a.above, a.below, a.clear) {
                (Some(t), _, Some(c)) if c > t => {
                    return Err(invalid(key("clear"), format!("must be at most `above` ({t})")));
                }
                (_, Some(t), Some(c)) if c < t => {
                    return Err(invalid(key("clear"), format!("must be at least `below` ({t})")));
                }
                _ => {}
            }
            if !matches!(a.severity.as_str(), "info" | "warning" | "critical") {
                return Err(invalid(key("severity"), format!("{:?} is not info, warning or critical", a.severity)));
            }
            if a.anomaly == Some(true) && !self.anomaly.iter().any(|m| parse_glob(&m.sensor).is_ok()) {
                return Err(invalid(
                    key("anomaly"),
                    "no [[anomaly]] model is configured, so no reading is ever flagged".into(),
                ));
            }
        }
        for (i, n) in self.notify.iter().enumerate() {
            if !matches!(n.url.scheme(), "http" | "https") {
                return Err(invalid(format!("notify[{i}].url"), "must be http or https".into()));
            }
        }
        if let Some(token) = &self.http.read_token {
            if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control() || c == ';') {
                return Err(invalid(
                    "http.read_token".into(),
                    "must be non-empty, without spaces, `;` or control characters (it travels in a header and a \
                     cookie)"
                        .into(),
                ));
            }
            if self.agents.iter().any(|a| &a.token == token) {
                return Err(invalid(
                    "http.read_token".into(),
                    "is also an agent's token; give readers their own, so a dashboard link cannot ingest".into(),
                ));
            }
        }
        // Read and checked here, so that a bad file stops the start with its key named; the server
        // reads them again when it starts listening.
        crate::tls::server_config(&self.http).map_err(|e| invalid(e.key.into(), e.reason))?;
        for (i, origin) in self.http.cors_origins.iter().enumerate() {
            let valid = origin == "*"
                || url::Url::parse(origin)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.path() == "/" && !origin.ends_with('/'));
            if !valid {
                return Err(invalid(
                    format!("http.cors_origins[{i}]"),
                    format!("{origin:?} must be an origin like https://grafana.example.com (no path), or \"*\""),
                ));
            }
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut tokens: HashMap<&str, usize> = HashMap::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.id.is_empty() {
                return Err(invalid(format!("agents[{i}].id"), "must not be empty".into()));
            }
            if agent.token.is_empty() {
                return Err(invalid(format!("agents[{i}].token"), "must not be empty".into()));
            }
            if agent.token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    format!("agents[{i}].token"),
                    "must not contain spaces or control characters (no Authorization header could carry it)".into(),
                ));
            }
            if let Some(first) = seen.insert(&agent.id, i) {
                return Err(invalid(
                    format!("agents[{i}].id"),
                    format!("duplicate agent id `{}` (already used by agents[{first}])", agent.id),
                ));
            }
            // The token itself is a secret: name the entries, not the value.
            if let Some(first) = tokens.insert(&agent.token, i) {
                return Err(invalid(
                    format!("agents[{i}].token"),
                    format!(
                        "duplicate token: agents[{first}] (`{}`) has the same one, so agent `{}` could never \
                         ingest (its batches would get 403); give each agent its own token",
                        self.agents[first].id, agent.id
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// What a pipeline version computes, recorded with it in `pipeline.json`: while a new version
/// replays, the serving one goes on with its own settings, not the file's new ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineSettings {
    pub pipeline: PipelineConfig,
    pub anomaly: Vec<AnomalyConfig>,
    pub alerts: Vec<AlertConfig>,
}

impl Config {
    pub fn pipeline_settings(&self) -> serde_json::Value {
        let settings = PipelineSettings {
            pipeline: self.pipeline.clone(),
            anomaly: self.anomaly.clone(),
            alerts: self.alerts.clone(),
        };
        serde_json::to_value(settings).unwrap_or_default()
    }

    /// This configuration with a recorded version's pipeline settings instead of its own.
    pub fn with_pipeline_settings(&self, settings: &serde_json::Value) -> Result<Config, String> {
        let settings: PipelineSettings = serde_json::from_value(settings.clone()).map_err(|e| e.to_string())?;
        Ok(Config { pipeline: settings.pipeline, anomaly: settings.anomaly, alerts: settings.alerts, ..self.clone() })
    }

    /// A digest of every setting that changes what the pipeline stores (windows, clock skew,
    /// anomaly models, event-time alert rules), in a form independent of the file's layout: a
    /// version's tables were computed under exactly one fingerprint.
    pub fn pipeline_fingerprint(&self) -> String {
        use sha2::Digest;
        let spec = self.pipeline_spec();
        let event_alerts: Vec<&AlertConfig> = self.alerts.iter().filter(|a| a.stale.is_none()).collect();
        let text = format!(
            "calendars={:?}\nmax_clock_skew_ms={}\nanomaly={:?}\nalerts={:?}",
            spec.calendars
                .iter()
                .map(|c| match c {
                    crate::pipeline::calendar::Calendar::Fixed(ms) => format!("{ms}ms"),
                    crate::pipeline::calendar::Calendar::Days { name, .. } => format!("days:{name}"),
                })
                .collect::<Vec<_>>(),
            spec.max_clock_skew_ms,
            self.anomaly,
            event_alerts
        );
        let digest = sha2::Sha256::digest(text.as_bytes());
        digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// What the pipeline computes: the window calendars, finest first, then calendar days.
    /// The `[[alerts]]` rules with `stale`: processing time, checked apart from the pipeline.
    pub fn stale_rules(&self) -> Vec<crate::stale::StaleRule> {
        self.alerts
            .iter()
            .filter_map(|a| {
                Some(crate::stale::StaleRule {
                    name: a.name.clone(),
                    sensor: parse_glob(&a.sensor).ok()?,
                    after: a.stale?,
                    severity: a.severity.clone(),
                })
            })
            .collect()
    }

    pub fn pipeline_spec(&self) -> crate::pipeline::PipelineSpec {
        use crate::pipeline::calendar::Calendar;
        let mut sizes: Vec<i64> = self.pipeline.windows.iter().filter_map(|w| parse_window_size(w).ok()).collect();
        sizes.sort_unstable();
        let mut calendars: Vec<Calendar> = sizes.into_iter().map(Calendar::fixed).collect();
        if let Some(cal) = self.pipeline.days.as_ref().and_then(|d| Calendar::days(&d.tz).ok()) {
            calendars.push(cal);
        }
        let anomaly = self
            .anomaly
            .iter()
            .filter_map(|a| {
                Some(crate::pipeline::anomaly::AnomalyRule {
                    sensor: parse_glob(&a.sensor).ok()?,
                    model: a.model,
                    threshold: a.threshold,
                    warmup: a.warmup,
                    window: a.window,
                })
            })
            .collect();
        let alerts = self
            .alerts
            .iter()
            .filter_map(|a| {
                use crate::pipeline::alert::Condition;
                let condition = match (a.above, a.below, a.rate_above, a.rate_below, a.anomaly) {
                    (Some(t), ..) => Condition::Above { threshold: t, clear: a.clear.unwrap_or(t) },
                    (_, Some(t), ..) => Condition::Below { threshold: t, clear: a.clear.unwrap_or(t) },
                    (_, _, Some(r), ..) => Condition::RateAbove(r),
                    (_, _, _, Some(r), _) => Condition::RateBelow(r),
                    (_, _, _, _, Some(true)) => Condition::Anomaly,
                    _ => return None, // `stale`: processing time, see crate::stale
                };
                Some(crate::pipeline::alert::AlertRule {
                    name: a.name.clone(),
                    sensor: parse_glob(&a.sensor).ok()?,
                    condition,
                    for_ms: a.for_.as_millis().min(i64::MAX as u128) as i64,
                    severity: a.severity.clone(),
                })
            })
            .collect();
        crate::pipeline::PipelineSpec {
            calendars,
            max_clock_skew_ms: self.pipeline.max_clock_skew.as_millis().min(i64::MAX as u128) as i64,
            anomaly,
            alerts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/tributary/aggregator.toml"))
    }

    #[test]
    fn the_embedded_example_is_a_valid_config() {
        let config = parse(EXAMPLE_CONFIG).unwrap();
        assert_eq!(config.http.listen, default_listen());
        assert_eq!(config.agents[0].id, "gw-1");
    }

    #[test]
    fn retain_is_an_age_or_a_size_with_its_unit() {
        assert_eq!(parse_retain("30d"), Ok(Retain::Age(Duration::from_secs(30 * 86_400))));
        assert_eq!(parse_retain("50GB"), Ok(Retain::Bytes(50_000_000_000)));
        assert_eq!(parse_retain("512MiB"), Ok(Retain::Bytes(512 << 20)));
        assert_eq!(parse_retain(" 1.5 TB "), Ok(Retain::Bytes(1_500_000_000_000)));
        for bad in ["", "10", "0s", "500ms", "12KB", "1e30GB", "-5GB", "a week"] {
            assert!(parse_retain(bad).is_err(), "{bad:?} was taken");
        }
        let text = "data_dir = \"/d\"\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n[log]\nretain = \"forever\"\n";
        let error = Config::parse(text, Path::new("a.toml")).unwrap_err().to_string();
        assert!(error.contains("log.retain") && error.contains("\"30d\""), "{error}");
    }

    #[test]
    fn listen_defaults_to_localhost_8080() {
        let config = parse("data_dir = \"/d\"\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n").unwrap();
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn unknown_key_names_file_table_and_key() {
        let err = parse("data_dir = \"/d\"\n[http]\nlistn = \"127.0.0.1:1\"\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/tributary/aggregator.toml:3:1: "), "{err}");
        assert!(err.contains("http.listn"), "{err}");
        assert!(err.contains("unknown field `listn`"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = parse("data_dir = \"/d\"\n[http]\nlisten = \"nope\"\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.listen"), "{err}");
        assert!(err.starts_with("/etc/tributary/aggregator.toml:3:10: http.listen: "), "{err}");
    }

    #[test]
    fn duplicate_ids_and_empty_tokens_are_rejected() {
        let err =
            parse("data_dir = \"/d\"\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n[[agents]]\nid = \"a\"\ntoken = \"u\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("agents[1].id") && err.contains("duplicate agent id `a`"), "{err}");
        let err = parse("data_dir = \"/d\"\n[[agents]]\nid = \"a\"\ntoken = \"\"\n").unwrap_err().to_string();
        assert!(err.contains("agents[0].token: must not be empty"), "{err}");
    }

    #[test]
    fn duplicate_and_unusable_tokens_are_rejected() {
        let err =
            parse("data_dir = \"/d\"\n[[agents]]\nid = \"a\"\ntoken = \"s3cret\"\n[[agents]]\nid = \"b\"\ntoken = \"s3cret\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("/etc/tributary/aggregator.toml: agents[1].token: duplicate token"), "{err}");
        assert!(err.contains("agents[0] (`a`)") && err.contains("agent `b`"), "{err}");
        assert!(!err.contains("s3cret"), "the token leaked into the error: {err}");
        let err = parse("data_dir = \"/d\"\n[[agents]]\nid = \"a\"\ntoken = \"two words\"\n").unwrap_err().to_string();
        assert!(err.contains("agents[0].token: must not contain spaces"), "{err}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let err = parse("[[agents]]\nid = \"a\"\ntoken = \"t\"\n").unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/tributary/aggregator.toml") && err.ends_with(": data_dir: missing field `data_dir`"),
            "{err}"
        );
        let err = parse("data_dir = \"/d\"\n[[agents]]\nid = \"a\"\n").unwrap_err().to_string();
        assert!(err.contains("token"), "{err}");
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key_read_relative_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(tls.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(tls.join("server.key"), key.serialize_pem()).unwrap();
        let file = dir.path().join("aggregator.toml");
        let with = |http: &str| {
            Config::parse(&format!("data_dir = \"/d\"\n[http]\n{http}\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n"), &file)
        };
        let config =
            with("tls_cert = \"tls/server.pem\"\ntls_key = \"tls/server.key\"\ntls_client_ca = \"tls/server.pem\"")
                .unwrap();
        assert_eq!(config.http.tls_cert, Some(tls.join("server.pem")));
        assert!(crate::tls::server_config(&config.http).unwrap().is_some());
        assert!(crate::tls::server_config(&HttpConfig::default()).unwrap().is_none(), "plain HTTP by default");

        let error = |http: &str| with(http).unwrap_err().to_string();
        let e = error("tls_cert = \"tls/server.pem\"");
        assert!(e.contains("http.tls_key: required with tls_cert"), "{e}");
        let e = error("tls_key = \"tls/server.key\"");
        assert!(e.contains("http.tls_cert: required with tls_key"), "{e}");
        let e = error("tls_client_ca = \"tls/server.pem\"");
        assert!(e.contains("http.tls_client_ca: client certificates need HTTPS"), "{e}");
        let e = error("tls_cert = \"tls/server.pem\"\ntls_key = \"tls/server.pem\"");
        assert!(e.contains("http.tls_key") && e.contains("holds no private key"), "{e}");
        let e = error("tls_cert = \"tls/server.key\"\ntls_key = \"tls/server.key\"");
        assert!(e.contains("http.tls_cert") && e.contains("holds no certificate"), "{e}");
        let e = error("tls_cert = \"tls/server.pem\"\ntls_key = \"tls/missing.key\"");
        assert!(
            e.contains("http.tls_key: cannot read") && e.contains(&tls.join("missing.key").display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn read_tokens_and_cors_origins_are_checked() {
        let base = "data_dir = \"/d\"\n[[agents]]\nid = \"a\"\ntoken = \"t\"\n";
        let with = |http: &str| parse(&format!("{base}[http]\n{http}\n"));
        let config = with("read_token = \"r\"\ncors_origins = [\"https://g.example.com\", \"*\"]").unwrap();
        assert_eq!(config.http.read_token.as_deref(), Some("r"));
        let err = with("read_token = \"t\"").unwrap_err().to_string();
        assert!(err.contains("http.read_token") && err.contains("agent's token"), "{err}");
        let err = with("read_token = \"a b\"").unwrap_err().to_string();
        assert!(err.contains("http.read_token"), "{err}");
        for bad in ["https://g.example.com/", "https://g.example.com/path", "g.example.com", "ftp://x"] {
            let err = with(&format!("cors_origins = [{bad:?}]")).unwrap_err().to_string();
            assert!(err.contains("http.cors_origins[0]"), "{bad}: {err}");
        }
    }
}
