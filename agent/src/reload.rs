//! SIGHUP: the configuration file read again and applied to the running agent where it can be.
//!
//! Applied at once, without dropping an MQTT connection or touching the spool: the `[[filter]]`
//! rules (every intake takes them at its next message, reading or tick; [`crate::filter`] says what
//! becomes of the readings the old rules hold), the `[[serial]]` ports
//! ([`crate::input::serial::SerialPorts`]: only the ports that differ stop, start or restart) and
//! the upstream token. The rest (MQTT input, spool, HTTP listener, agent id, ...) is built once at
//! start: a change there is named in one warning and applies at the next restart. A file that does
//! not load is refused whole and the configuration in force stays. Both outcomes are counted in
//! `tributary_agent_config_reloads_total{result}`.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, UpstreamConfig};
use crate::input::FilterRules;
use crate::input::serial::SerialPorts;
use crate::metrics::Metrics;

/// A configuration read again, or why it could not be used (the file's error, with its key).
pub type Reload = Result<Config, String>;

/// Applies reloads to the running agent.
pub struct Reloader {
    /// The configuration in force: the one the agent started with, with what reloads applied.
    running: Config,
    filters: watch::Sender<FilterRules>,
    token: watch::Sender<String>,
    metrics: Arc<Metrics>,
}

impl Reloader {
    /// `filters` and `token` reach the intakes and the forwarder.
    pub fn new(
        running: Config,
        filters: watch::Sender<FilterRules>,
        token: watch::Sender<String>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader { running, filters, token, metrics }
    }

    /// Applies what can change at runtime, and warns about the rest; or refuses a file that did
    /// not load. Returns once removed and changed serial ports have handed over what they read.
    pub async fn apply(&mut self, reload: Reload, serial: &mut SerialPorts) {
        let new = match reload {
            Ok(new) => new,
            Err(error) => {
                self.metrics.config_reload("refused");
                tracing::error!("SIGHUP: configuration refused, the one in force stays: {error}");
                return;
            }
        };
        let mut applied = false;
        // Compared by their Debug text, as serial ports are: every setting, those added later included.
        if format!("{:?}", new.filter) != format!("{:?}", self.running.filter) {
            self.filters.send_replace(new.filter.as_slice().into());
            self.running.filter = new.filter.clone();
            tracing::info!(sections = new.filter.len(), "configuration read again: the new [[filter]] rules apply now");
            applied = true;
        }
        let ports = serial.reconfigure(&new.serial).await;
        self.running.serial = new.serial.clone();
        if !ports.is_empty() {
            tracing::info!(
                started = ?ports.added,
                stopped = ?ports.removed,
                restarted = ?ports.changed,
                "configuration read again: serial ports changed"
            );
            applied = true;
        }
        if new.upstream.token != *self.token.borrow() {
            self.token.send_replace(new.upstream.token.clone());
            tracing::warn!("configuration read again: the new upstream token applies now");
            applied = true;
        }
        self.running.upstream.token = new.upstream.token.clone();
        self.running.upstream.token_file = new.upstream.token_file.clone();
        let later = restart_only_changes(&self.running, &new);
        if !later.is_empty() {
            tracing::warn!(
                "configuration read again: {} changed; that applies at the next restart (the agent runs with the old value until then)",
                later.join(", ")
            );
        } else if !applied {
            tracing::info!("configuration read again: nothing changed");
        }
        self.metrics.config_reload("applied");
    }
}

/// A part of the configuration, as text to compare (Debug: every field, those added later included).
type Part = fn(&Config) -> String;

/// Settings built into the running agent once, by key.
const RESTART_ONLY: &[(&str, Part)] = &[
    ("agent_id", |c| format!("{:?}", c.agent_id)),
    ("data_dir", |c| format!("{:?}", c.data_dir)),
    ("http.listen", |c| format!("{:?}", c.http.listen)),
    ("mqtt.mode", |c| format!("{:?}", c.mqtt.mode)),
    ("mqtt.listen", |c| format!("{:?}", c.mqtt.listen)),
    ("mqtt.url", |c| format!("{:?}", c.mqtt.url)),
    ("mqtt.client_id", |c| format!("{:?}", c.mqtt.client_id)),
    ("mqtt.topics", |c| format!("{:?}", c.mqtt.topics)),
    ("mqtt.max_payload_bytes", |c| format!("{:?}", c.mqtt.max_payload_bytes)),
    ("mqtt.max_readings_per_message", |c| format!("{:?}", c.mqtt.max_readings_per_message)),
    ("validation.max_clock_skew", |c| format!("{:?}", c.validation.max_clock_skew)),
    ("validation.max_new_sensors_per_minute", |c| format!("{:?}", c.validation.max_new_sensors_per_minute)),
    ("spool.commit_interval", |c| format!("{:?}", c.spool.commit_interval)),
    ("spool.gather_interval", |c| format!("{:?}", c.spool.gather_interval)),
    ("spool.max_commit_interval", |c| format!("{:?}", c.spool.max_commit_interval)),
    ("spool.sync_interval", |c| format!("{:?}", c.spool.sync_interval)),
    ("spool.max_block_readings", |c| format!("{:?}", c.spool.max_block_readings)),
    ("spool.max_queued_readings", |c| format!("{:?}", c.spool.max_queued_readings)),
    ("spool.sync", |c| format!("{:?}", c.spool.sync)),
    ("spool.max_bytes", |c| format!("{:?}", c.spool.max_bytes)),
    ("spool.overflow", |c| format!("{:?}", c.spool.overflow)),
    ("spool.max_age", |c| format!("{:?}", c.spool.max_age)),
    ("health.interval", |c| format!("{:?}", c.health.interval)),
    ("upstream.url", |c| format!("{:?}", c.upstream.url)),
    ("upstream.batch_max_readings", |c| format!("{:?}", c.upstream.batch_max_readings)),
    ("upstream.timeout", |c| format!("{:?}", c.upstream.timeout)),
    ("upstream.retry_initial", |c| format!("{:?}", c.upstream.retry_initial)),
    ("upstream.retry_max", |c| format!("{:?}", c.upstream.retry_max)),
];

/// Whole tables, so that a key not listed above (added to the configuration later) is still named,
/// by its table. The token is left out of `upstream`: it applies at once.
const RESTART_ONLY_TABLES: &[(&str, Part)] = &[
    ("http", |c| format!("{:?}", c.http)),
    ("mqtt", |c| format!("{:?}", c.mqtt)),
    ("validation", |c| format!("{:?}", c.validation)),
    ("spool", |c| format!("{:?}", c.spool)),
    ("health", |c| format!("{:?}", c.health)),
    ("clock", |c| format!("{:?}", c.clock)),
    ("upstream", |c| {
        let upstream = UpstreamConfig { token: String::new(), token_file: None, ..c.upstream.clone() };
        format!("{upstream:?}")
    }),
];

/// The keys whose value differs between the configuration in force and `new` and that apply only
/// at the next restart.
pub fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys: Vec<&'static str> =
        RESTART_ONLY.iter().filter(|(_, part)| part(running) != part(new)).map(|(key, _)| *key).collect();
    for (table, part) in RESTART_ONLY_TABLES {
        let named = keys.iter().any(|k| k.strip_prefix(table).is_some_and(|rest| rest.starts_with('.')));
        if !named && part(running) != part(new) {
            keys.push(table);
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
agent_id = "gw-1"
data_dir = "/var/lib/tributary-agent"
[upstream]
url = "http://127.0.0.1:8080"
token = "t"
[mqtt]
listen = "127.0.0.1:1883"
[[serial]]
path = "/dev/ttyUSB0"
format = "lines"
[[filter]]
sensor = "**"
range = { max = 100.0 }
"#;

    fn config(text: &str) -> Config {
        Config::parse(text, std::path::Path::new("/etc/agent.toml")).unwrap()
    }

    #[test]
    fn what_applies_at_runtime_is_not_named_for_a_restart() {
        let running = config(BASE);
        let new = config(
            &BASE
                .replace("token = \"t\"", "token = \"t2\"")
                .replace("ttyUSB0", "ttyUSB1")
                .replace("max = 100.0", "max = 50.0"),
        );
        assert_eq!(restart_only_changes(&running, &new), Vec::<&str>::new());
        assert_eq!(restart_only_changes(&running, &running), Vec::<&str>::new());
    }

    #[test]
    fn settings_built_at_start_are_named_by_key() {
        let running = config(BASE);
        let new = config(
            &BASE
                .replace("gw-1", "gw-2")
                .replace("127.0.0.1:1883", "0.0.0.0:1883")
                .replace("[upstream]", "[spool]\nmax_bytes = 1000\nsync = \"normal\"\n[upstream]")
                .replace("token = \"t\"", "token = \"t\"\nretry_max = \"1m\""),
        );
        assert_eq!(
            restart_only_changes(&running, &new),
            ["agent_id", "mqtt.listen", "spool.sync", "spool.max_bytes", "upstream.retry_max"]
        );
    }

    #[test]
    fn every_key_of_the_restart_only_tables_is_named() {
        // A key missing from RESTART_ONLY would be named by its table only: list them all.
        let running = config(BASE);
        for (text, key) in [
            ("[http]\nlisten = \"127.0.0.1:9999\"\n", "http.listen"),
            ("[health]\ninterval = \"5s\"\n", "health.interval"),
            ("[validation]\nmax_clock_skew = \"1m\"\n", "validation.max_clock_skew"),
            ("[validation]\nmax_new_sensors_per_minute = 5\n", "validation.max_new_sensors_per_minute"),
            ("[spool]\ncommit_interval = \"1ms\"\n", "spool.commit_interval"),
            ("[spool]\nmax_block_readings = 7\n", "spool.max_block_readings"),
            ("[spool]\nmax_queued_readings = 7\n", "spool.max_queued_readings"),
            ("[spool]\noverflow = \"drop_newest\"\n", "spool.overflow"),
            ("[spool]\nmax_age = \"1d\"\n", "spool.max_age"),
        ] {
            let new = config(&BASE.replace("[upstream]", &format!("{text}[upstream]")));
            assert_eq!(restart_only_changes(&running, &new), [key], "{text}");
        }
        for (text, key) in [
            ("mode = \"client\"\nurl = \"mqtt://broker:1883\"\nclient_id = \"x\"\n", "mqtt.mode"),
            ("topics = [\"a/#\"]\n", "mqtt.topics"),
            ("max_payload_bytes = 7\n", "mqtt.max_payload_bytes"),
            ("max_readings_per_message = 7\n", "mqtt.max_readings_per_message"),
        ] {
            let new = config(&BASE.replace("[mqtt]\n", &format!("[mqtt]\n{text}")));
            assert!(restart_only_changes(&running, &new).contains(&key), "{text}");
            assert!(!restart_only_changes(&running, &new).contains(&"mqtt"), "{text}");
        }
        for (text, key) in [
            ("batch_max_readings = 7\n", "upstream.batch_max_readings"),
            ("timeout = \"1s\"\n", "upstream.timeout"),
            ("retry_initial = \"1s\"\n", "upstream.retry_initial"),
        ] {
            let new = config(&BASE.replace("token = \"t\"\n", &format!("token = \"t\"\n{text}")));
            assert_eq!(restart_only_changes(&running, &new), [key], "{text}");
        }
        let new = config(&BASE.replace("http://127.0.0.1:8080", "http://10.0.0.1:8080"));
        assert_eq!(restart_only_changes(&running, &new), ["upstream.url"]);
        let new = config(&BASE.replace("/var/lib/tributary-agent", "/srv/agent"));
        assert_eq!(restart_only_changes(&running, &new), ["data_dir"]);
    }
}
