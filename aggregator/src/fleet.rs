//! What each agent last said about itself, for the fleet view: when it last reached the
//! aggregator and what its spool still held (the `x-tributary-backlog` header of its batches).
//! Processing-time state, kept in memory: the next batch after a restart brings it back.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::HeaderMap;
use serde::Serialize;

/// An agent not heard from for this long is offline.
pub const OFFLINE_AFTER_MS: i64 = 60_000;
/// An agent whose spool holds at least this many readings is catching up (after an outage).
pub const CATCHING_UP_READINGS: u64 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Contact {
    /// Unix ms of its last authenticated request.
    pub at: i64,
    pub backlog_readings: Option<u64>,
    pub backlog_bytes: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Fleet {
    agents: Mutex<HashMap<String, Contact>>,
}

impl Fleet {
    /// Records a request of `agent` at `now`, with the backlog its headers state.
    pub fn contact(&self, agent: &str, headers: &HeaderMap, now: i64) -> Contact {
        let backlog =
            headers.get(tributary_shared::batch::BACKLOG_HEADER).and_then(|v| v.to_str().ok()).and_then(parse_backlog);
        let contact = Contact { at: now, backlog_readings: backlog.map(|b| b.0), backlog_bytes: backlog.map(|b| b.1) };
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.insert(agent.to_string(), contact);
        contact
    }

    pub fn get(&self, agent: &str) -> Option<Contact> {
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).get(agent).copied()
    }
}

/// `readings=<n>, bytes=<n>`, in any order; anything else is ignored (`None`).
pub fn parse_backlog(text: &str) -> Option<(u64, u64)> {
    let (mut readings, mut bytes) = (None, None);
    for part in text.split(',') {
        let (key, value) = part.trim().split_once('=')?;
        let value: u64 = value.trim().parse().ok()?;
        match key.trim() {
            "readings" => readings = Some(value),
            "bytes" => bytes = Some(value),
            _ => {}
        }
    }
    Some((readings?, bytes?))
}

/// `online`, `catching_up`, `offline` or `never_seen`, from the last contact (this process's
/// life) and the last reading's arrival (the store's, across restarts).
pub fn state(contact: Option<Contact>, last_seen: Option<i64>, now: i64) -> &'static str {
    let last = contact.map(|c| c.at).max(last_seen);
    match last {
        None => "never_seen",
        Some(at) if now.saturating_sub(at) > OFFLINE_AFTER_MS => "offline",
        Some(_) if contact.and_then(|c| c.backlog_readings).is_some_and(|b| b >= CATCHING_UP_READINGS) => "catching_up",
        Some(_) => "online",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_headers_parse_or_are_ignored() {
        assert_eq!(parse_backlog("readings=12, bytes=3400"), Some((12, 3400)));
        assert_eq!(parse_backlog(" bytes=1,readings=2 "), Some((2, 1)));
        for bad in ["", "readings=1", "readings=-1, bytes=2", "readings=x, bytes=2", "nonsense"] {
            assert_eq!(parse_backlog(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn states_follow_contact_and_backlog() {
        let c = |at, backlog| Some(Contact { at, backlog_readings: backlog, backlog_bytes: None });
        assert_eq!(state(None, None, 0), "never_seen");
        assert_eq!(state(None, Some(0), 61_000), "offline");
        assert_eq!(state(None, Some(0), 60_000), "online");
        assert_eq!(state(c(100_000, Some(50_000)), Some(0), 110_000), "catching_up");
        assert_eq!(state(c(100_000, Some(9_999)), None, 110_000), "online");
        assert_eq!(state(c(100_000, Some(50_000)), None, 200_000), "offline");
    }
}
