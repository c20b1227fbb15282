//! `tributary-aggregator backup` and `restore`: a consistent copy of the data directory taken
//! while the aggregator runs, and putting one back.
//!
//! Each database is copied with SQLite's online backup API in a single step, i.e. inside one read
//! transaction: a consistent snapshot, and in WAL mode the writer goes on committing meanwhile.
//! The version registry (`pipeline.json`) goes first, then the serving stores (`store.db`, and
//! `store-v<N>.db` of later pipeline versions) and the stale-alert state (`stale.db`), *before* the
//! log, so the store's committed offset is never ahead of the copied log: the restored processor
//! continues where the store stopped instead of rebuilding from offset 0 (the store can always be
//! rebuilt from the log, but on a large log that takes a while). Copies are written in rollback
//! journal mode, one self-contained file each; the aggregator switches them back to WAL on start.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

use crate::inspect;
use crate::lock::{DataDirLock, LOCK_FILE, LockError};

/// The manifest's file name inside a backup directory.
pub const MANIFEST: &str = "backup.json";

/// The databases of a data directory, in the order they are copied (the log last, see above);
/// the stores of pipeline versions after the first (`store-v<N>.db`) go with `store.db`.
const DATABASES: [&str; 3] = ["store.db", "stale.db", "log.db"];

/// A version's store beyond the first: `store-v<N>.db`.
fn is_version_store(name: &str) -> bool {
    name.strip_prefix("store-v")
        .and_then(|rest| rest.strip_suffix(".db"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What `backup` copies from `data_dir`, in order: the version registry, the stores, the log.
fn files_of(data_dir: &Path) -> Result<Vec<String>, BackupError> {
    let mut versions: Vec<String> = std::fs::read_dir(data_dir)
        .map_err(io(data_dir))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| is_version_store(name))
        .collect();
    versions.sort();
    let mut files = vec![crate::versions::REGISTRY_FILE.to_string(), DATABASES[0].to_string()];
    files.extend(versions);
    files.extend(DATABASES[1..].iter().map(|s| s.to_string()));
    Ok(files)
}

/// How often a busy step is retried (a checkpoint holding a lock), 50 ms apart.
const BUSY_RETRIES: u32 = 200;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("no log at {0}: is data_dir in the config right, and has the aggregator run there once?")]
    NoLog(PathBuf),
    #[error("{0} is not empty: choose an empty or new directory, or pass --force to overwrite")]
    NotEmpty(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("copying {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("copying {0}: the database stayed busy; try again")]
    Busy(PathBuf),
    #[error("{dir} is not a backup ({MANIFEST} missing or unreadable: {reason})")]
    NotABackup { dir: PathBuf, reason: String },
    #[error("the backup's {file} is damaged (integrity_check: {report}); nothing was restored")]
    Damaged { file: String, report: String },
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error(transparent)]
    Inspect(#[from] inspect::InspectError),
}

/// `backup.json`: what a backup holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub tool: String,
    pub version: String,
    /// When the copy was taken (RFC 3339 UTC and Unix ms).
    pub created_at: String,
    pub created_at_ms: i64,
    pub source_data_dir: PathBuf,
    pub files: Vec<ManifestFile>,
    /// The copied log's offsets `[first, end)` and size.
    pub log_first_offset: u64,
    pub log_end_offset: u64,
    pub log_blocks: u64,
    pub log_readings: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_path_buf(), source }
}

/// Whether `dir` exists and holds anything but `ignore`.
fn has_entries(dir: &Path, ignore: &str) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                if entry.map_err(io(dir))?.file_name() != ignore {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Copies the databases of `data_dir` into `to` and writes the manifest.
pub fn backup(data_dir: &Path, to: &Path, force: bool) -> Result<Manifest, BackupError> {
    if !data_dir.join("log.db").is_file() {
        return Err(BackupError::NoLog(data_dir.join("log.db")));
    }
    if !force && has_entries(to, "")? {
        return Err(BackupError::NotEmpty(to.to_path_buf()));
    }
    std::fs::create_dir_all(to).map_err(io(to))?;
    // An older manifest must not describe a half-written new backup.
    remove_if_present(&to.join(MANIFEST))?;
    let created_at_ms = crate::unix_ms();
    let mut files = Vec::new();
    for name in files_of(data_dir)? {
        let source = data_dir.join(&name);
        if !source.is_file() {
            continue;
        }
        let target = to.join(&name);
        if name == crate::versions::REGISTRY_FILE {
            // Written whole by rename: a plain read is a consistent copy.
            write_durably(&target, &std::fs::read(&source).map_err(io(&source))?)?;
        } else {
            copy_online(&source, &target)?;
        }
        let bytes = std::fs::metadata(&target).map_err(io(&target))?.len();
        files.push(ManifestFile { name, bytes });
    }
    let stats = inspect::open_log(to)?.stats()?;
    let manifest = Manifest {
        tool: env!("CARGO_PKG_NAME").to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        created_at: inspect::rfc3339(created_at_ms),
        created_at_ms,
        source_data_dir: data_dir.to_path_buf(),
        files,
        log_first_offset: stats.first_offset,
        log_end_offset: stats.end_offset,
        log_blocks: stats.blocks,
        log_readings: stats.readings,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| io(to)(e.into()))?;
    write_durably(&to.join(MANIFEST), &json)?;
    sync_dir(to)?;
    Ok(manifest)
}

/// One database, online, in one backup step (one consistent snapshot).
fn copy_online(source: &Path, target: &Path) -> Result<(), BackupError> {
    let sqlite = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BackupError::Sqlite { path, source }
    };
    let partial = target.with_extension("db.partial");
    remove_if_present(&partial)?;
    let from = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(sqlite(source))?;
    // A busy step (a checkpoint in progress) is retried by SQLite itself for this long.
    from.busy_timeout(Duration::from_secs(5)).map_err(sqlite(source))?;
    let mut to = Connection::open(&partial).map_err(sqlite(&partial))?;
    {
        let backup = Backup::new(&from, &mut to).map_err(sqlite(source))?;
        let mut tries = 0;
        loop {
            // -1: every page in one step, so the copy is one snapshot; steps of a few pages
            // would restart whenever the aggregator commits between them.
            match backup.step(-1).map_err(sqlite(source))? {
                StepResult::Done => break,
                StepResult::More => continue,
                StepResult::Busy | StepResult::Locked => {
                    tries += 1;
                    if tries > BUSY_RETRIES {
                        return Err(BackupError::Busy(source.to_path_buf()));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                // StepResult is non-exhaustive.
                _ => continue,
            }
        }
    }
    // One self-contained file: no -wal beside it to lose when the backup is moved.
    let _: String =
        to.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0)).map_err(sqlite(&partial))?;
    drop(to);
    File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    std::fs::rename(&partial, target).map_err(io(target))?;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), BackupError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).map_err(io(&partial))?;
    File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    std::fs::rename(&partial, path).map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    // Makes the renames durable; directories cannot be opened for syncing everywhere.
    #[cfg(unix)]
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))?;
    let _ = dir;
    Ok(())
}

/// Reads and checks a backup's manifest.
pub fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let not_a_backup = |reason: String| BackupError::NotABackup { dir: from.to_path_buf(), reason };
    let text = std::fs::read(from.join(MANIFEST)).map_err(|e| not_a_backup(e.to_string()))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| not_a_backup(e.to_string()))?;
    if !manifest.files.iter().any(|f| f.name == "log.db") {
        return Err(not_a_backup("it lists no log.db".into()));
    }
    let known =
        |name: &str| DATABASES.contains(&name) || is_version_store(name) || name == crate::versions::REGISTRY_FILE;
    if let Some(odd) = manifest.files.iter().find(|f| !known(&f.name)) {
        return Err(not_a_backup(format!("it lists an unknown file {:?}", odd.name)));
    }
    Ok(manifest)
}

/// Puts a backup into `data_dir`: checks every file, then replaces the databases, while holding
/// the data directory's lock (so no aggregator can be running on it).
pub fn restore(data_dir: &Path, from: &Path, force: bool) -> Result<Manifest, BackupError> {
    let manifest = read_manifest(from)?;
    for file in &manifest.files {
        let path = from.join(&file.name);
        let checked = if file.name == crate::versions::REGISTRY_FILE {
            std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_slice::<crate::versions::Registry>(&text).map_err(|e| e.to_string()))
                .map(|_| ())
        } else {
            crate::store::check_file(&path, "integrity_check")
        };
        checked.map_err(|report| BackupError::Damaged { file: file.name.clone(), report })?;
    }
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let _lock = DataDirLock::acquire(data_dir)?;
    if !force && has_entries(data_dir, LOCK_FILE)? {
        return Err(BackupError::NotEmpty(data_dir.to_path_buf()));
    }
    // Every database and its WAL goes, also one the backup lacks: a store or a WAL left from the
    // old data would not match the restored log.
    let mut old = files_of(data_dir)?;
    old.retain(|name| name != crate::versions::REGISTRY_FILE);
    remove_if_present(&data_dir.join(crate::versions::REGISTRY_FILE))?;
    for name in old {
        for suffix in ["", "-wal", "-shm", "-journal", "-unsynced"] {
            remove_if_present(&data_dir.join(format!("{name}{suffix}")))?;
        }
    }
    for file in &manifest.files {
        let (source, target) = (from.join(&file.name), data_dir.join(&file.name));
        let partial = data_dir.join(format!("{}.partial", file.name));
        std::fs::copy(&source, &partial).map_err(io(&source))?;
        File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
        std::fs::rename(&partial, &target).map_err(io(&target))?;
    }
    sync_dir(data_dir)?;
    Ok(manifest)
}
