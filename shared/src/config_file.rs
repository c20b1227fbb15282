//! Loading a TOML configuration file so that every error names the file, the key and the reason,
//! e.g. `/etc/tributary/agent.toml:7:1: upstream.tokn: unknown field `tokn`, expected one of ...`.
//!
//! Deserialise into structs marked `#[serde(deny_unknown_fields)]`: a typo then stops the process
//! at start instead of silently leaving a default in place.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration file", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `place` is the file, with `:line:column` when the parser knows where.
    #[error("{place}: {key}: {reason}")]
    Invalid { place: String, key: String, reason: String },
}

impl ConfigError {
    /// A value that parses but is not usable (checked after deserialising).
    pub fn invalid(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { place: file.display().to_string(), key: key.into(), reason: reason.into() }
    }
}

/// Reads and parses `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_path_buf(), source })?;
    parse(&text, path)
}

/// Parses configuration `text`; `file` names it in errors.
pub fn parse<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let invalid = |key: String, reason: &str, span: Option<Range<usize>>| ConfigError::Invalid {
        place: place(text, file, span),
        key,
        reason: reason.trim().to_string(),
    };
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| invalid("(syntax)".into(), e.message(), e.span()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let parent = match e.path().to_string() {
            top if top == "." => String::new(),
            path => path,
        };
        let error = e.into_inner();
        let reason = error.message();
        // serde reports a missing key at its table; name the key itself.
        let key = match reason.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            Some(field) if parent.is_empty() => field.to_string(),
            Some(field) => format!("{parent}.{field}"),
            None if parent.is_empty() => "(top level)".to_string(),
            None => parent,
        };
        invalid(key, reason, error.span())
    })
}

/// "file:line:column" where the span is known, as compilers print it; the file alone otherwise.
fn place(text: &str, file: &Path, span: Option<Range<usize>>) -> String {
    match span {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{}:{line}:{column}", file.display())
        }
        None => file.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Example {
        name: String,
        #[serde(default)]
        http: Http,
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Http {
        listen: Option<std::net::SocketAddr>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        id: String,
        token: String,
    }

    fn error(text: &str) -> String {
        parse::<Example>(text, Path::new("/etc/x.toml")).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_place_the_key_and_the_reason() {
        let e = error("name = \"a\"\n[http]\nlistn = 1\n");
        assert!(e.starts_with("/etc/x.toml:3:1: http.listn: unknown field `listn`, expected `listen`"), "{e}");
        let e = error("name = \"a\"\n[http]\nlisten = \"nope\"\n");
        assert_eq!(e, "/etc/x.toml:3:10: http.listen: invalid socket address syntax");
        let e = error("[http]\n");
        assert!(e.starts_with("/etc/x.toml") && e.contains(": name: missing field `name`"), "{e}");
        let e = error("name = \"a\"\n[[items]]\nid = \"a\"\n");
        assert!(e.contains("items[0].token: missing field `token`"), "{e}");
        let e = error("name = \"a\"\nname = \"b\"\n");
        assert!(e.starts_with("/etc/x.toml:2:1: (syntax): duplicate key"), "{e}");
    }

    #[test]
    fn a_missing_file_says_so() {
        let e = load::<Example>(Path::new("/nonexistent/x.toml")).unwrap_err();
        assert_eq!(e.to_string(), "/nonexistent/x.toml: cannot read the configuration file");
        assert!(std::error::Error::source(&e).is_some());
    }
}
