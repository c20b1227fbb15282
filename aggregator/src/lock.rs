//! The data directory's lock: one process at a time owns `data_dir` (the aggregator while it runs,
//! `restore` while it replaces the files). Two writers on one log would break exactly-once.
//!
//! An advisory `flock` on `data_dir/aggregator.lock`: the kernel drops it when the process ends,
//! also by SIGKILL, so a crash never leaves a stale lock behind. The file holds the owner's pid,
//! for the error message only.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside `data_dir`.
pub const LOCK_FILE: &str = "aggregator.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open the lock file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is locked by another process ({owner}): an aggregator or a restore is using this data_dir; stop it first"
    )]
    Held { path: PathBuf, owner: String },
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock of `data_dir` (which must exist) without waiting.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| LockError::Open { path: path.clone(), source })?;
        if !try_lock(&file) {
            let mut owner = String::new();
            let _ = file.read_to_string(&mut owner);
            let owner = match owner.trim() {
                "" => "pid unknown".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(LockError::Held { path, owner });
        }
        // Best effort: the pid only makes the message above more helpful.
        let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(unix)]
fn try_lock(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this function borrows; no memory is passed.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Elsewhere there is no lock: one process per data_dir is up to the operator.
#[cfg(not(unix))]
fn try_lock(_file: &File) -> bool {
    true
}
