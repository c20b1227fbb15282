//! Stale-sensor alerts (`[[alerts]] stale = "10m"`): the one processing-time condition.
//!
//! Whether a sensor is silent depends on the wall clock, not on the log, so these alerts stay
//! out of the pipeline's deterministic tables: a thread of their own compares each matching
//! sensor's `last_seen` with the clock a few times per threshold, and keeps the lifecycle
//! (firing → resolved) in `stale.db` beside the store (its own file, so it never contends for
//! the store's write lock). A replay of the log therefore never fires or resolves them.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;

use crate::notify::Notifier;
use crate::store::{Page, StoreError};

/// One `[[alerts]]` rule with `stale`, compiled.
#[derive(Debug, Clone)]
pub struct StaleRule {
    pub name: String,
    pub sensor: globset::GlobMatcher,
    pub after: Duration,
    pub severity: String,
}

/// A stale alert as `/api/v1/alerts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct StaleAlert {
    pub id: u64,
    pub rule: String,
    pub sensor: String,
    pub severity: String,
    pub state: String,
    /// When it fired (Unix ms, the aggregator's clock).
    pub fired_at: i64,
    /// When the sensor was last heard from, as of firing.
    pub last_seen: i64,
    pub resolved_at: Option<i64>,
}

/// Opens (creating if needed) `stale.db`.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    crate::store::plan_once(&conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS stale_alerts (
            id INTEGER PRIMARY KEY,
            rule TEXT NOT NULL,
            sensor TEXT NOT NULL,
            severity TEXT NOT NULL,
            state TEXT NOT NULL,
            fired_at INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            resolved_at INTEGER
        );
        CREATE INDEX IF NOT EXISTS stale_alerts_by_state ON stale_alerts (state, id);",
    )?;
    Ok(conn)
}

/// Stale alerts in `state` (or all), newest first, at most `limit`.
pub fn list(conn: &Connection, state: Option<&str>, limit: usize) -> Result<Page<StaleAlert>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, rule, sensor, severity, state, fired_at, last_seen, resolved_at FROM stale_alerts
         WHERE ?1 IS NULL OR state = ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let rows: Vec<StaleAlert> = stmt
        .query_map(params![state, limit.saturating_add(1) as i64], |r| {
            Ok(StaleAlert {
                id: r.get::<_, i64>(0)?.max(0) as u64,
                rule: r.get(1)?,
                sensor: r.get(2)?,
                severity: r.get(3)?,
                state: r.get(4)?,
                fired_at: r.get(5)?,
                last_seen: r.get(6)?,
                resolved_at: r.get(7)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(Page::of(rows, limit))
}

/// The running checker; dropping `stop` ends it.
pub struct StaleChecker {
    pub stop: mpsc::Sender<()>,
    pub thread: JoinHandle<()>,
}

/// How often the rules are checked: a quarter of the shortest threshold, within bounds.
fn tick(rules: &[StaleRule]) -> Duration {
    let shortest = rules.iter().map(|r| r.after).min().unwrap_or(Duration::from_secs(60));
    (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Starts checking `rules` against the sensors in the serving store (it follows a switch of
/// pipeline version); `None` without stale rules.
pub fn start(
    rules: Vec<StaleRule>,
    serving: crate::store::StoreReader,
    stale_path: &Path,
    notifier: Notifier,
) -> Result<Option<StaleChecker>, StoreError> {
    if rules.is_empty() {
        return Ok(None);
    }
    let conn = open(stale_path)?;
    let store_path = serving.path();
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("stale-alerts".into())
        .spawn(move || {
            let mut checker = Checker { rules, conn, store: None, store_path, serving: Some(serving), notifier };
            let every = tick(&checker.rules);
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                if let Err(error) = checker.check(crate::unix_ms()) {
                    // A busy or briefly missing store: try again next tick.
                    tracing::warn!(%error, "stale-sensor check failed; retrying");
                    checker.store = None;
                }
            }
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot start the stale-alert thread: {e}")))?;
    Ok(Some(StaleChecker { stop, thread }))
}

struct Checker {
    rules: Vec<StaleRule>,
    conn: Connection,
    store: Option<Connection>,
    store_path: std::path::PathBuf,
    serving: Option<crate::store::StoreReader>,
    notifier: Notifier,
}

impl Checker {
    fn check(&mut self, now: i64) -> Result<(), StoreError> {
        if let Some(path) = self.serving.as_ref().map(crate::store::StoreReader::path) {
            if path != self.store_path {
                self.store_path = path;
                self.store = None;
            }
        }
        if self.store.is_none() {
            let store = Connection::open_with_flags(
                &self.store_path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            crate::store::plan_once(&store)?;
            self.store = Some(store);
        }
        let Some(store) = &self.store else { return Ok(()) };
        let mut stmt = store.prepare_cached(
            "SELECT s.name, t.last_seen FROM series s JOIN sensors t ON t.series = s.id WHERE t.count > 0",
        )?;
        let sensors: Vec<(String, i64)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
        let firing: std::collections::HashMap<(String, String), u64> = {
            let mut stmt =
                self.conn.prepare_cached("SELECT rule, sensor, id FROM stale_alerts WHERE state = 'firing'")?;
            stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get::<_, i64>(2)? as u64)))?
                .collect::<Result<_, _>>()?
        };
        let mut notifications = Vec::new();
        let tx = self.conn.transaction()?;
        for rule in &self.rules {
            let after = rule.after.as_millis().min(i64::MAX as u128) as i64;
            for (sensor, last_seen) in sensors.iter().filter(|(name, _)| rule.sensor.is_match(name)) {
                let silent = now.saturating_sub(*last_seen) > after;
                let key = (rule.name.clone(), sensor.clone());
                match (firing.get(&key), silent) {
                    (None, true) => {
                        tx.execute(
                            "INSERT INTO stale_alerts (rule, sensor, severity, state, fired_at, last_seen)
                             VALUES (?1, ?2, ?3, 'firing', ?4, ?5)",
                            params![rule.name, sensor, rule.severity, now, last_seen],
                        )?;
                        notifications.push(body(tx.last_insert_rowid(), rule, sensor, "firing", now, *last_seen));
                    }
                    (Some(id), false) => {
                        tx.execute(
                            "UPDATE stale_alerts SET state = 'resolved', resolved_at = ?2 WHERE id = ?1",
                            params![*id as i64, now],
                        )?;
                        notifications.push(body(*id as i64, rule, sensor, "resolved", now, *last_seen));
                    }
                    _ => {}
                }
            }
        }
        tx.commit()?;
        for n in notifications {
            tracing::info!(rule = %n["rule"], sensor = %n["sensor"], state = %n["state"], "stale-sensor alert");
            self.notifier.send(n);
        }
        Ok(())
    }
}

fn body(id: i64, rule: &StaleRule, sensor: &str, state: &str, now: i64, last_seen: i64) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "kind": "stale",
        "rule": rule.name,
        "sensor": sensor,
        "severity": rule.severity,
        "state": state,
        "at": now,
        "last_seen": last_seen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_sensor_fires_once_and_resolves_when_heard_again() {
        let dir = tempfile::tempdir().unwrap();
        let store_path = dir.path().join("store.db");
        let store = crate::store::open_write(&store_path).unwrap();
        store
            .execute_batch(
                "INSERT INTO series (id, name) VALUES (1, 'line1/temp'), (2, 'line2/temp'), (3, 'other');
                 INSERT INTO sensors VALUES (1, 5, 0, 0, 1.0, 1000), (2, 5, 0, 0, 1.0, 50000), (3, 5, 0, 0, 1.0, 1000);",
            )
            .unwrap();
        let rule = StaleRule {
            name: "silent".into(),
            sensor: crate::config::parse_glob("line*/temp").unwrap(),
            after: Duration::from_secs(30),
            severity: "critical".into(),
        };
        let mut checker = Checker {
            rules: vec![rule],
            conn: open(&dir.path().join("stale.db")).unwrap(),
            store: None,
            store_path,
            serving: None,
            notifier: Notifier::default(),
        };
        let states = |c: &Checker| -> Vec<(String, String)> {
            list(&c.conn, None, 10).unwrap().rows.into_iter().map(|a| (a.sensor, a.state)).collect()
        };
        checker.check(32_000).unwrap();
        assert_eq!(states(&checker), [("line1/temp".to_string(), "firing".to_string())]);
        checker.check(40_000).unwrap();
        assert_eq!(states(&checker).len(), 1, "a firing alert is not fired again");
        store.execute("UPDATE sensors SET last_seen = 80000 WHERE series = 1", []).unwrap();
        checker.check(90_000).unwrap();
        assert_eq!(
            states(&checker),
            [("line2/temp".to_string(), "firing".to_string()), ("line1/temp".into(), "resolved".into())]
        );
    }
}
