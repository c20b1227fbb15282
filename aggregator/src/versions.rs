//! Pipeline versions: Kappa reprocessing run and switched by the aggregator itself.
//!
//! Every version has its own serving store (`store.db` for version 1, `store-v<N>.db` after) and
//! its own derived streams in the log (agent `_pipeline`, epoch `N - 1`). `pipeline.json` in the
//! data directory records which version serves, the settings' fingerprint each was computed
//! under, and when each was promoted and retired. At start, [`plan`] compares it with the
//! configuration: the same version with the same settings serves on; a higher version is replayed
//! from offset 0 in the background while the old one serves, and promoted once it has folded as
//! much of the log as the serving one (the API switches stores between two requests); the same
//! version with different settings is refused. A retired version's store is kept for
//! `keep_previous` for [`rollback`], then deleted.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::pipeline::processor::ProcessorStatus;

/// Highest version number: derived streams use `version - 1` as their log epoch.
pub const MAX_VERSION: u32 = 1_000_000;
/// The registry's file name in the data directory.
pub const REGISTRY_FILE: &str = "pipeline.json";

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error(
        "[pipeline] version = {version} was computed with other settings (windows, clock skew, anomaly models or \
         alert rules) than this configuration has; raise [pipeline] version to {next} to replay the log with the new \
         settings, or put the old settings back"
    )]
    SettingsChanged { version: u32, next: u32 },
    #[error(
        "version {serving} of the pipeline is serving, and the configuration names version {configured}, an older \
         one; to go back, run `tributary-aggregator pipeline rollback --config FILE` (while a previous version is \
         kept), or raise [pipeline] version above {serving}"
    )]
    Older { serving: u32, configured: u32 },
    #[error(
        "version {version} of the pipeline was rolled back (version {serving} serves); set [pipeline] version = \
         {serving} with its settings, or raise it to {next} to try new settings"
    )]
    RolledBack { version: u32, serving: u32, next: u32 },
    #[error("no previous version to roll back to: version {serving} serves, and {reason}")]
    NoPrevious { serving: u32, reason: String },
    #[error(
        "{path}: {detail}; it records which pipeline version serves: restore it from a backup, or delete it to adopt the configured version"
    )]
    Registry { path: PathBuf, detail: String },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Serving,
    Replaying,
    Retired,
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRecord {
    pub version: u32,
    pub state: State,
    /// [`crate::Config::pipeline_fingerprint`] of the settings its tables were computed with.
    pub fingerprint: String,
    /// Unix ms.
    pub created_at: i64,
    pub promoted_at: Option<i64>,
    pub retired_at: Option<i64>,
    /// Its store was deleted (retired longer than `keep_previous`).
    #[serde(default)]
    pub dropped: bool,
    /// The log offset it had folded when it was promoted: what it computed below that, it
    /// computed replaying history (its alerts there were stored, not sent).
    #[serde(default)]
    pub promoted_offset: Option<u64>,
    /// Its settings ([`crate::config::PipelineSettings`]): a serving version goes on with them
    /// while a newer one replays. `null` for a store from before versions were recorded.
    #[serde(default)]
    pub settings: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub serving: u32,
    pub versions: Vec<VersionRecord>,
}

impl Registry {
    pub fn get(&self, version: u32) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == version)
    }

    fn get_mut(&mut self, version: u32) -> Option<&mut VersionRecord> {
        self.versions.iter_mut().find(|v| v.version == version)
    }

    /// The version being replayed, if any.
    pub fn replaying(&self) -> Option<u32> {
        self.versions.iter().find(|v| v.state == State::Replaying).map(|v| v.version)
    }

    /// Marks `new` serving and the serving one retired, at `now`.
    pub fn promote(&mut self, new: u32, now: i64, offset: u64) {
        let old = self.serving;
        if let Some(r) = self.get_mut(old) {
            r.state = State::Retired;
            r.retired_at = Some(now);
        }
        if let Some(r) = self.get_mut(new) {
            r.state = State::Serving;
            r.promoted_at = Some(now);
            r.promoted_offset = Some(offset);
        }
        self.serving = new;
    }

    /// Retired versions whose stores are due for deletion at `now`.
    pub fn expired(&self, keep: Duration, now: i64) -> Vec<u32> {
        let keep = keep.as_millis().min(i64::MAX as u128) as i64;
        self.versions
            .iter()
            .filter(|v| matches!(v.state, State::Retired | State::RolledBack) && !v.dropped)
            .filter(|v| v.retired_at.is_some_and(|at| now.saturating_sub(at) >= keep))
            .map(|v| v.version)
            .collect()
    }
}

/// What the aggregator runs at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// One version, serving.
    Serve(u32),
    /// `serving` serves while `new` replays the log from its start.
    Replay { serving: u32, new: u32 },
}

/// The serving store of `version`.
pub fn store_path(data_dir: &Path, version: u32) -> PathBuf {
    if version <= 1 { data_dir.join("store.db") } else { data_dir.join(format!("store-v{version}.db")) }
}

/// The log epoch `version`'s derived streams are appended under (agent `_pipeline`).
pub fn derived_epoch(version: u32) -> i64 {
    i64::from(version.max(1)) - 1
}

pub fn load(data_dir: &Path) -> Result<Option<Registry>, VersionError> {
    let path = data_dir.join(REGISTRY_FILE);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VersionError::Registry { path, detail: e.to_string() }),
    };
    let registry: Registry = serde_json::from_slice(&text)
        .map_err(|e| VersionError::Registry { path: path.clone(), detail: e.to_string() })?;
    if registry.get(registry.serving).is_none() {
        return Err(VersionError::Registry {
            path,
            detail: format!("serving version {} is not listed", registry.serving),
        });
    }
    Ok(Some(registry))
}

/// Writes the registry atomically: a temporary file, fsync, rename, fsync of the directory.
pub fn save(data_dir: &Path, registry: &Registry) -> Result<(), VersionError> {
    use std::io::Write;
    let path = data_dir.join(REGISTRY_FILE);
    let tmp = data_dir.join(format!("{REGISTRY_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(registry).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(data_dir)?.sync_all()
    };
    write().map_err(|source| VersionError::Write { path, source })
}

/// Decides what runs, from the registry (if any) and the configured version and fingerprint,
/// and returns the registry to save.
pub fn plan(
    data_dir: &Path,
    configured: u32,
    fingerprint: &str,
    settings: &serde_json::Value,
    now: i64,
) -> Result<(Registry, Plan), VersionError> {
    let record = |version: u32, state: State| VersionRecord {
        version,
        state,
        fingerprint: fingerprint.to_string(),
        created_at: now,
        promoted_at: (state == State::Serving).then_some(now),
        retired_at: None,
        dropped: false,
        promoted_offset: None,
        settings: Some(settings.clone()),
    };
    let Some(mut registry) = load(data_dir)? else {
        // No registry: a new data directory, or one from before versions (its store is version 1,
        // computed with settings nobody recorded: adopted as they are).
        let old = store_path(data_dir, 1);
        if configured > 1 && store_has_data(&old) {
            let mut first = record(1, State::Serving);
            first.fingerprint = String::new();
            first.settings = None;
            let registry = Registry { serving: 1, versions: vec![first, record(configured, State::Replaying)] };
            return Ok((registry, Plan::Replay { serving: 1, new: configured }));
        }
        let registry = Registry { serving: configured, versions: vec![record(configured, State::Serving)] };
        return Ok((registry, Plan::Serve(configured)));
    };
    let serving = registry.serving;
    let next = registry.versions.iter().map(|v| v.version).max().unwrap_or(serving).saturating_add(1);
    if configured < serving {
        return Err(VersionError::Older { serving, configured });
    }
    if configured == serving {
        let Some(r) = registry.get_mut(serving) else {
            return Err(VersionError::Registry {
                path: data_dir.join(REGISTRY_FILE),
                detail: "no serving record".into(),
            });
        };
        if r.fingerprint.is_empty() {
            r.fingerprint = fingerprint.to_string();
            r.settings = Some(settings.clone());
        } else if r.fingerprint != fingerprint {
            return Err(VersionError::SettingsChanged { version: configured, next });
        }
        // A replay of a higher version that the configuration no longer names is abandoned.
        abandon_replays(data_dir, &mut registry, None, now);
        return Ok((registry, Plan::Serve(serving)));
    }
    match registry.get(configured).map(|r| (r.state, r.fingerprint.clone())) {
        Some((State::Replaying, f)) if f == fingerprint => {}
        Some((State::Replaying, _)) => return Err(VersionError::SettingsChanged { version: configured, next }),
        Some((State::RolledBack | State::Retired, _)) => {
            return Err(VersionError::RolledBack { version: configured, serving, next });
        }
        Some((State::Serving, _)) => {
            return Err(VersionError::Registry {
                path: data_dir.join(REGISTRY_FILE),
                detail: format!("versions {serving} and {configured} are both marked serving"),
            });
        }
        None => {
            // A store left by an earlier try of this number (the registry was lost) is not ours.
            remove_store(&store_path(data_dir, configured));
            registry.versions.push(record(configured, State::Replaying));
        }
    }
    abandon_replays(data_dir, &mut registry, Some(configured), now);
    Ok((registry, Plan::Replay { serving, new: configured }))
}

/// Replays of versions other than `keep` stop for good: their stores are deleted.
fn abandon_replays(data_dir: &Path, registry: &mut Registry, keep: Option<u32>, now: i64) {
    for r in &mut registry.versions {
        if r.state == State::Replaying && Some(r.version) != keep {
            tracing::warn!(version = r.version, "abandoning the replay of a version the configuration no longer names");
            remove_store(&store_path(data_dir, r.version));
            r.state = State::RolledBack;
            r.retired_at = Some(now);
            r.dropped = true;
        }
    }
}

/// Serves the previous retired version again (whose store is still kept) instead of the serving
/// one, which is marked rolled back. Offline: the caller holds the data directory's lock.
/// Returns (from, to).
pub fn rollback(data_dir: &Path, now: i64) -> Result<(u32, u32), VersionError> {
    let Some(mut registry) = load(data_dir)? else {
        return Err(VersionError::NoPrevious { serving: 1, reason: format!("{REGISTRY_FILE} does not exist yet") });
    };
    let serving = registry.serving;
    let previous = registry
        .versions
        .iter()
        .filter(|v| v.version < serving && v.state == State::Retired && !v.dropped)
        .filter(|v| store_path(data_dir, v.version).exists())
        .map(|v| v.version)
        .max();
    let Some(previous) = previous else {
        return Err(VersionError::NoPrevious {
            serving,
            reason: "no earlier version's tables are kept (they are deleted keep_previous after the switch)".into(),
        });
    };
    abandon_replays(data_dir, &mut registry, None, now);
    if let Some(r) = registry.get_mut(serving) {
        r.state = State::RolledBack;
        r.retired_at = Some(now);
    }
    if let Some(r) = registry.get_mut(previous) {
        r.state = State::Serving;
        r.promoted_at = Some(now);
        r.retired_at = None;
    }
    registry.serving = previous;
    save(data_dir, &registry)?;
    Ok((serving, previous))
}

/// Deletes the stores of versions retired longer than `keep` and records it; returns them.
pub fn drop_expired(data_dir: &Path, registry: &mut Registry, keep: Duration, now: i64) -> Vec<u32> {
    let expired = registry.expired(keep, now);
    for &version in &expired {
        remove_store(&store_path(data_dir, version));
        if let Some(r) = registry.get_mut(version) {
            r.dropped = true;
        }
        tracing::info!(version, "deleted the tables of a retired pipeline version (keep_previous is over)");
    }
    expired
}

fn remove_store(path: &Path) {
    if let Err(error) = crate::store::remove_files(path) {
        tracing::warn!(%error, "cannot delete a pipeline version's store");
    }
}

/// Whether a store file holds a committed offset beyond 0.
fn store_has_data(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    let Ok(conn) = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) else { return true };
    conn.query_row("SELECT max(next_offset) FROM processor_offsets", [], |r| r.get::<_, Option<i64>>(0))
        .map(|offset| offset.unwrap_or(0) > 0)
        .unwrap_or(true)
}

/// A digest of a version's tables, independent of how the log was cut into commits: every row of
/// every table the pipeline writes, in key order (not `set_aside_at`, which is the wall clock).
/// A window row stored in parts counts as one row of their bytes joined: where the parts split
/// depends on when commits sealed them. Returns (the committed offset it covers, the digest).
pub fn checksum(conn: &Connection) -> Result<(u64, String), rusqlite::Error> {
    use rusqlite::types::ValueRef;
    use sha2::Digest;
    const TABLES: [(&str, &str); 12] = [
        ("processor_offsets", "SELECT name, next_offset FROM processor_offsets ORDER BY name"),
        ("pipeline_meta", "SELECT key, value FROM pipeline_meta ORDER BY key"),
        ("series", "SELECT id, name FROM series ORDER BY id"),
        ("sensors", "SELECT * FROM sensors ORDER BY series"),
        ("windows", "SELECT size, series, row, data FROM windows ORDER BY size, series, row, part"),
        ("agents", "SELECT * FROM agents ORDER BY id"),
        ("quarantine", "SELECT * FROM quarantine ORDER BY offset"),
        ("set_aside", "SELECT first_offset, count, agent_id, reason FROM set_aside ORDER BY first_offset"),
        ("anomaly_models", "SELECT * FROM anomaly_models ORDER BY series"),
        ("anomalies", "SELECT * FROM anomalies ORDER BY offset"),
        ("alert_states", "SELECT * FROM alert_states ORDER BY rule, series"),
        ("alerts", "SELECT * FROM alerts ORDER BY id"),
    ];
    let tx = conn.unchecked_transaction()?;
    let offset: Option<i64> = tx.query_row("SELECT max(next_offset) FROM processor_offsets", [], |r| r.get(0))?;
    let mut hash = sha2::Sha256::new();
    for (table, sql) in TABLES {
        hash.update(table.as_bytes());
        let mut stmt = tx.prepare(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query([])?;
        if table == "windows" {
            let mut joined: Option<([i64; 3], Vec<u8>)> = None;
            let mut hash_row = |(key, data): ([i64; 3], Vec<u8>)| {
                for v in key {
                    hash.update([1u8]);
                    hash.update(v.to_le_bytes());
                }
                hash.update([3u8]);
                hash.update((data.len() as u64).to_le_bytes());
                hash.update(&data);
            };
            while let Some(row) = rows.next()? {
                let key = [row.get(0)?, row.get(1)?, row.get(2)?];
                let data = row.get_ref(3)?.as_blob()?;
                match &mut joined {
                    Some((k, bytes)) if *k == key => bytes.extend_from_slice(data),
                    _ => {
                        if let Some(done) = joined.replace((key, data.to_vec())) {
                            hash_row(done);
                        }
                    }
                }
            }
            if let Some(done) = joined {
                hash_row(done);
            }
            continue;
        }
        while let Some(row) = rows.next()? {
            for i in 0..columns {
                match row.get_ref(i)? {
                    ValueRef::Null => hash.update([0u8]),
                    ValueRef::Integer(v) => {
                        hash.update([1u8]);
                        hash.update(v.to_le_bytes());
                    }
                    ValueRef::Real(v) => {
                        hash.update([2u8]);
                        hash.update(v.to_bits().to_le_bytes());
                    }
                    ValueRef::Text(v) | ValueRef::Blob(v) => {
                        hash.update([3u8]);
                        hash.update((v.len() as u64).to_le_bytes());
                        hash.update(v);
                    }
                }
            }
        }
    }
    let digest = hash.finalize();
    Ok((offset.unwrap_or(0).max(0) as u64, digest.iter().take(16).map(|b| format!("{b:02x}")).collect()))
}

/// A processor running one version.
pub struct Running {
    pub version: u32,
    pub thread: crate::pipeline::processor::ProcessorThread,
    pub alive: crate::Liveness,
    pub serving: Arc<AtomicBool>,
    /// When it started and from which offset: its rate.
    pub started: Instant,
    pub from: u64,
    /// What the API can serve from its tables (window sizes, staleness).
    pub layout: Arc<crate::api::ApiLayout>,
}

/// What the API knows about versions: the registry, the running processors' progress, and the
/// serving processor's health (for `/healthz`).
pub struct Versions {
    data_dir: PathBuf,
    registry: Mutex<Registry>,
    progress: Mutex<BTreeMap<u32, Progress>>,
    checksums: Mutex<HashMap<u32, (u64, String, Instant)>>,
    /// Held while a checksum is computed: one scan of a store at a time, however many clients
    /// poll `/api/v1/pipeline`.
    computing: Mutex<()>,
    serving_processor: RwLock<(crate::Liveness, ProcessorStatus)>,
    layout: RwLock<Arc<crate::api::ApiLayout>>,
    head: watch::Receiver<u64>,
}

/// A running version's committed offset, and when and where it started (its rate).
type Progress = (watch::Receiver<u64>, Instant, u64);

/// A version as `GET /api/v1/pipeline` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionStatus {
    pub version: u32,
    pub state: State,
    /// The log offset its tables are complete up to.
    pub offset: Option<u64>,
    pub head: u64,
    /// Readings per second folded since it started (running versions).
    pub rate: Option<f64>,
    /// Seconds until a replay catches up at that rate.
    pub eta_s: Option<f64>,
    /// A digest of its tables ([`checksum`]) and the offset it covers.
    pub checksum: Option<String>,
    pub checksum_offset: Option<u64>,
    pub fingerprint: String,
    pub created_at: i64,
    pub promoted_at: Option<i64>,
    pub retired_at: Option<i64>,
}

/// How old a cached checksum of a version that keeps moving may be.
const CHECKSUM_MAX_AGE: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain values: a panic elsewhere cannot leave them half-written.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Versions {
    pub fn new(
        data_dir: &Path,
        registry: Registry,
        layout: Arc<crate::api::ApiLayout>,
        head: watch::Receiver<u64>,
    ) -> Versions {
        Versions {
            data_dir: data_dir.to_path_buf(),
            registry: Mutex::new(registry),
            progress: Mutex::new(BTreeMap::new()),
            checksums: Mutex::new(HashMap::new()),
            computing: Mutex::new(()),
            serving_processor: RwLock::new((crate::Liveness::default(), ProcessorStatus::default())),
            layout: RwLock::new(layout),
            head,
        }
    }

    pub fn serving(&self) -> u32 {
        lock(&self.registry).serving
    }

    /// Below this offset the serving version computed its results replaying history.
    pub fn replayed_below(&self) -> u64 {
        let registry = lock(&self.registry);
        registry.get(registry.serving).and_then(|r| r.promoted_offset).unwrap_or(0)
    }

    /// What the serving version's tables hold (window sizes) and the staleness settings.
    pub fn layout(&self) -> Arc<crate::api::ApiLayout> {
        self.layout.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The serving version's layout and its store, taken together: a promotion switches both
    /// under the layout's lock, so a request never plans with one version and reads another.
    pub fn serving_view(
        &self,
        store: &crate::store::StoreReader,
    ) -> (Arc<crate::api::ApiLayout>, crate::store::StoreSnapshot) {
        let layout = self.layout.read().unwrap_or_else(|p| p.into_inner());
        (layout.clone(), store.snapshot())
    }

    /// Whether the serving version's processor thread runs.
    pub fn processor_alive(&self) -> bool {
        self.serving_processor.read().unwrap_or_else(|p| p.into_inner()).0.is_alive()
    }

    /// Why the serving version's processor is stuck, if it is.
    pub fn processor_stalled(&self) -> Option<String> {
        self.serving_processor.read().unwrap_or_else(|p| p.into_inner()).1.stalled()
    }

    fn track(&self, running: &Running) {
        lock(&self.progress).insert(running.version, (running.thread.committed.clone(), running.started, running.from));
    }

    fn set_serving_processor(&self, running: &Running) {
        *self.serving_processor.write().unwrap_or_else(|p| p.into_inner()) =
            (running.alive.clone(), running.thread.status.clone());
    }

    /// Every version, newest first, with progress and checksums (computed here: call off the
    /// async runtime).
    pub fn status(&self) -> (u32, Vec<VersionStatus>) {
        let registry = lock(&self.registry).clone();
        let head = *self.head.borrow();
        let progress: BTreeMap<u32, (u64, Instant, u64)> =
            lock(&self.progress).iter().map(|(v, (rx, at, from))| (*v, (*rx.borrow(), *at, *from))).collect();
        let mut out = Vec::new();
        for r in registry.versions.iter().rev() {
            let running = progress.get(&r.version).filter(|_| matches!(r.state, State::Serving | State::Replaying));
            let rate = running
                .map(|(offset, at, from)| offset.saturating_sub(*from) as f64 / at.elapsed().as_secs_f64().max(0.001));
            let mut offset = running.map(|(offset, ..)| *offset);
            let (mut checksum, mut checksum_offset) = (None, None);
            if r.state != State::Replaying && !r.dropped {
                if let Some((at, sum)) = self.checksum_of(r.version, offset) {
                    offset = offset.or(Some(at));
                    (checksum, checksum_offset) = (Some(sum), Some(at));
                }
            }
            let eta_s = match (r.state, offset, rate) {
                (State::Replaying, Some(offset), Some(rate)) if rate > 0.0 => {
                    Some((head.saturating_sub(offset) as f64 / rate * 10.0).round() / 10.0)
                }
                _ => None,
            };
            out.push(VersionStatus {
                version: r.version,
                state: r.state,
                offset,
                head,
                rate: rate.map(f64::round),
                eta_s,
                checksum,
                checksum_offset,
                fingerprint: r.fingerprint.clone(),
                created_at: r.created_at,
                promoted_at: r.promoted_at,
                retired_at: r.retired_at,
            });
        }
        (registry.serving, out)
    }

    /// The cached checksum of `version`, recomputed when its offset moved and the cache is older
    /// than [`CHECKSUM_MAX_AGE`] (or it never was computed).
    fn checksum_of(&self, version: u32, offset: Option<u64>) -> Option<(u64, String)> {
        let cached = || {
            lock(&self.checksums)
                .get(&version)
                .filter(|(at, _, when)| offset.is_none_or(|o| o == *at) || when.elapsed() < CHECKSUM_MAX_AGE)
                .map(|(at, sum, _)| (*at, sum.clone()))
        };
        if let Some(hit) = cached() {
            return Some(hit);
        }
        let _one_at_a_time = lock(&self.computing);
        // Another request may have computed it meanwhile.
        if let Some(hit) = cached() {
            return Some(hit);
        }
        let path = store_path(&self.data_dir, version);
        let computed =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .and_then(|conn| checksum(&conn));
        match computed {
            Ok((at, sum)) => {
                lock(&self.checksums).insert(version, (at, sum.clone(), Instant::now()));
                Some((at, sum))
            }
            Err(error) => {
                tracing::warn!(version, %error, "cannot compute the checksum of a pipeline version");
                None
            }
        }
    }
}

/// What starts a processor for a version: the log, where its outputs go.
#[derive(Clone)]
pub struct Starter {
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    pub end: watch::Receiver<u64>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub log: crate::log::LogHandle,
    pub notifier: crate::notify::Notifier,
    pub live: crate::live::Hub,
    pub runtime: tokio::runtime::Handle,
}

impl Starter {
    /// Starts `version`'s processor on its store, computing what `config` says.
    pub fn start(
        &self,
        version: u32,
        config: &crate::Config,
        serving: bool,
    ) -> Result<Running, crate::pipeline::processor::ProcessError> {
        let (spec, layout) = (config.pipeline_spec(), Arc::new(crate::api::ApiLayout::from_config(config)));
        let alive = crate::Liveness::default();
        let serving = Arc::new(AtomicBool::new(serving));
        let thread = crate::pipeline::processor::start(
            &self.log_path,
            &store_path(&self.data_dir, version),
            spec,
            self.end.clone(),
            self.metrics.clone(),
            alive.clone(),
            crate::pipeline::processor::Outputs {
                log: self.log.clone(),
                notifier: self.notifier.clone(),
                runtime: self.runtime.clone(),
                live: self.live.clone(),
                derived_epoch: derived_epoch(version),
                serving: serving.clone(),
            },
        )?;
        let from = *thread.committed.borrow();
        Ok(Running { version, thread, alive, serving, started: Instant::now(), from, layout })
    }
}

/// What the supervisor works with.
pub struct Supervised {
    pub versions: Arc<Versions>,
    /// The API's reader of the serving store.
    pub store: crate::store::StoreReader,
    pub starter: Starter,
    /// Configurations read again (SIGHUP).
    pub reload: Option<tokio::sync::mpsc::Receiver<crate::Config>>,
}

/// Runs the versions: promotes the replaying one once it has folded as much of the log as the
/// serving one, starts the replay of a version a reloaded configuration raises, deletes retired
/// stores after `keep`, and when `stop` turns true returns the processors still running (the
/// caller stops them after the log writer).
pub async fn supervise(
    supervised: Supervised,
    mut serving: Running,
    mut replay: Option<Running>,
    keep: Duration,
    mut stop: watch::Receiver<bool>,
) -> Vec<Running> {
    let Supervised { versions, store, starter, mut reload } = supervised;
    let metrics = starter.metrics.clone();
    versions.set_serving_processor(&serving);
    versions.track(&serving);
    metrics.pipeline_serving_version.set(i64::from(serving.version));
    if let Some(r) = &replay {
        versions.track(r);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_report = Instant::now();
    let mut last_expiry: Option<Instant> = None;
    loop {
        let reloaded = async {
            match reload.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
            config = reloaded => match config {
                Some(config) => {
                    if let Some(new) = reload_config(&versions, &starter, &config, replay.as_ref()) {
                        versions.track(&new);
                        replay = Some(new);
                    }
                }
                None => reload = None,
            },
        }
        if *stop.borrow() {
            break;
        }
        if let Some(new) = &replay {
            let (old_at, new_at) = (*serving.thread.committed.borrow(), *new.thread.committed.borrow());
            metrics.replay_offset.set(new_at as i64);
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = Instant::now();
                let rate = new_at.saturating_sub(new.from) as f64 / new.started.elapsed().as_secs_f64().max(0.001);
                let head = *versions.head.borrow();
                tracing::info!(
                    version = new.version,
                    offset = new_at,
                    head,
                    rate = rate.round(),
                    eta_s = (head.saturating_sub(new_at) as f64 / rate.max(1.0)).round(),
                    "replaying a new pipeline version"
                );
            }
            // A store built without fsync serves only once synced (the processor syncs it as
            // soon as it has caught up).
            if new_at >= old_at && !new.thread.unsynced.load(Ordering::Acquire) {
                let new = replay.take().expect("checked above");
                match promote(&versions, &store, &serving, &new) {
                    Ok(()) => {
                        tracing::info!(
                            version = new.version,
                            previous = serving.version,
                            offset = new_at,
                            took_s = new.started.elapsed().as_secs_f64(),
                            "promoted the new pipeline version: the API serves it from now on"
                        );
                        metrics.pipeline_serving_version.set(i64::from(new.version));
                        metrics.replay_offset.set(0);
                        // Until its next commit, the offset in /metrics is the old version's. Read
                        // now that it serves: a commit it made since `new_at` did not set it, and
                        // with the log at rest there may be no next commit.
                        metrics.processor_offset.set(*new.thread.committed.borrow() as i64);
                        let old = std::mem::replace(&mut serving, new);
                        lock(&versions.progress).remove(&old.version);
                        old.thread.stop.stop();
                        let thread = old.thread.thread;
                        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot promote the new pipeline version; retrying");
                        replay = Some(new);
                    }
                }
            }
        }
        if last_expiry.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            last_expiry = Some(Instant::now());
            let mut registry = lock(&versions.registry).clone();
            if !drop_expired(&versions.data_dir, &mut registry, keep, crate::unix_ms()).is_empty() {
                match save(&versions.data_dir, &registry) {
                    Ok(()) => *lock(&versions.registry) = registry,
                    Err(error) => tracing::error!(%error, "cannot record the deleted pipeline versions"),
                }
            }
        }
    }
    let mut running = vec![serving];
    running.extend(replay);
    running
}

/// A configuration read again: a raised version starts replaying; anything else is reported.
fn reload_config(
    versions: &Versions,
    starter: &Starter,
    config: &crate::Config,
    replaying: Option<&Running>,
) -> Option<Running> {
    tracing::info!("configuration read again: a new [pipeline] version applies now, other changes at the next restart");
    if let Some(r) = replaying {
        if r.version != config.pipeline.version {
            tracing::error!(
                replaying = r.version,
                configured = config.pipeline.version,
                "a replay is running; reload again once version {} serves",
                r.version
            );
        }
        return None;
    }
    let planned = plan(
        &versions.data_dir,
        config.pipeline.version,
        &config.pipeline_fingerprint(),
        &config.pipeline_settings(),
        crate::unix_ms(),
    );
    let (registry, new) = match planned {
        Ok((registry, Plan::Replay { new, .. })) => (registry, new),
        Ok((_, Plan::Serve(_))) => return None,
        Err(error) => {
            tracing::error!(%error, "the reloaded configuration is not applied");
            return None;
        }
    };
    if let Err(error) = save(&versions.data_dir, &registry) {
        tracing::error!(%error, "cannot record the new pipeline version; not replaying it");
        return None;
    }
    *lock(&versions.registry) = registry;
    match starter.start(new, config, false) {
        Ok(running) => {
            tracing::info!(version = new, "replaying the log into a new pipeline version (reloaded configuration)");
            Some(running)
        }
        Err(error) => {
            tracing::error!(%error, version = new, "cannot start the new pipeline version");
            None
        }
    }
}

/// Switches the API, the stale checker and the notifications from `old` to `new`. The registry
/// is saved first: a crash right after still comes back serving `new`.
fn promote(
    versions: &Versions,
    store: &crate::store::StoreReader,
    old: &Running,
    new: &Running,
) -> Result<(), VersionError> {
    let mut registry = lock(&versions.registry).clone();
    registry.promote(new.version, crate::unix_ms(), *new.thread.committed.borrow());
    old.serving.store(false, Ordering::Release);
    if let Err(error) = save(&versions.data_dir, &registry) {
        old.serving.store(true, Ordering::Release);
        return Err(error);
    }
    *lock(&versions.registry) = registry;
    {
        // Both under one lock: see `Versions::serving_view`.
        let mut layout = versions.layout.write().unwrap_or_else(|p| p.into_inner());
        *layout = new.layout.clone();
        store.switch(&store_path(&versions.data_dir, new.version));
    }
    versions.set_serving_processor(new);
    new.serving.store(true, Ordering::Release);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> serde_json::Value {
        serde_json::json!({"pipeline": {"windows": ["1m"]}})
    }

    #[test]
    fn a_new_directory_serves_the_configured_version() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, plan) = plan(dir.path(), 3, "aa", &settings(), 10).unwrap();
        assert_eq!(plan, Plan::Serve(3));
        assert_eq!(registry.serving, 3);
        save(dir.path(), &registry).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(registry));
    }

    #[test]
    fn same_version_other_settings_is_refused_and_a_higher_one_replays() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, _) = plan(dir.path(), 1, "aa", &settings(), 10).unwrap();
        save(dir.path(), &registry).unwrap();
        let err = plan(dir.path(), 1, "bb", &settings(), 20).unwrap_err();
        assert!(err.to_string().contains("raise [pipeline] version to 2"), "{err}");
        assert_eq!(plan(dir.path(), 1, "aa", &settings(), 20).unwrap().1, Plan::Serve(1));
        let (mut registry, p) = plan(dir.path(), 2, "bb", &settings(), 20).unwrap();
        assert_eq!(p, Plan::Replay { serving: 1, new: 2 });
        save(dir.path(), &registry).unwrap();
        // A restart during the replay resumes it; other settings under 2 are refused.
        assert_eq!(plan(dir.path(), 2, "bb", &settings(), 30).unwrap().1, Plan::Replay { serving: 1, new: 2 });
        assert!(matches!(
            plan(dir.path(), 2, "cc", &settings(), 30),
            Err(VersionError::SettingsChanged { next: 3, .. })
        ));
        registry.promote(2, 40, 0);
        save(dir.path(), &registry).unwrap();
        assert!(matches!(
            plan(dir.path(), 1, "aa", &settings(), 50),
            Err(VersionError::Older { serving: 2, configured: 1 })
        ));
        assert_eq!(registry.expired(Duration::from_millis(100), 139), Vec::<u32>::new());
        assert_eq!(registry.expired(Duration::from_millis(100), 140), vec![1]);
    }

    #[test]
    fn rollback_needs_a_kept_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        let (mut registry, _) = plan(dir.path(), 1, "aa", &settings(), 10).unwrap();
        save(dir.path(), &registry).unwrap();
        assert!(matches!(rollback(dir.path(), 20), Err(VersionError::NoPrevious { .. })));
        registry.versions.push(VersionRecord {
            version: 2,
            state: State::Replaying,
            fingerprint: "bb".into(),
            created_at: 20,
            promoted_at: None,
            retired_at: None,
            dropped: false,
            promoted_offset: None,
            settings: None,
        });
        registry.promote(2, 30, 0);
        save(dir.path(), &registry).unwrap();
        // Version 1's store file is gone: nothing to roll back to.
        assert!(matches!(rollback(dir.path(), 40), Err(VersionError::NoPrevious { .. })));
        std::fs::write(store_path(dir.path(), 1), b"").unwrap();
        assert_eq!(rollback(dir.path(), 40).unwrap(), (2, 1));
        let registry = load(dir.path()).unwrap().unwrap();
        assert_eq!(registry.serving, 1);
        assert_eq!(registry.get(2).unwrap().state, State::RolledBack);
        let err = plan(dir.path(), 2, "bb", &settings(), 50).unwrap_err();
        assert!(err.to_string().contains("rolled back"), "{err}");
        assert_eq!(plan(dir.path(), 1, "aa", &settings(), 50).unwrap().1, Plan::Serve(1));
    }
}
