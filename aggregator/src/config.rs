//! The aggregator's TOML configuration: what it reads at start and how it says what is wrong.
//!
//! Every struct denies unknown keys, so a typo stops the process instead of silently falling back
//! to a default. Errors name the file, the key and the reason.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
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
}

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on for ingest, the dashboard API, `/healthz` and `/metrics`.
    /// Default: `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: default_listen() }
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
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = config_file::load(path)?;
        config.check(path)?;
        Ok(config)
    }

    /// Parses and checks configuration text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = config_file::parse(text, path)?;
        config.check(path)?;
        Ok(config)
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

/// Turns a toml error into one line: the dotted key at the error's position, its line number and
/// the reason. toml's own message names an unknown field but not, for a bad value, the key.
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
}
