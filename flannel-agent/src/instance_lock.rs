//! One flanneld per subnet file: the agent holds an exclusive lock on `<subnet-file>.lock`
//! while it runs, so a second agent with the same `--subnet-file` (the same network on this
//! host) refuses to start, and `flanneld uninstall` can tell that an agent is still running.
//!
//! The lock is an flock(2): the kernel drops it when the process dies, even by SIGKILL, so a
//! crashed agent never leaves a stale lock. The file holds the PID for messages only.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another flanneld{} is running with --subnet-file {subnet_file} (it holds {lock}): stop it first, or give each network its own --subnet-file", pid_text(*.pid))]
    Held {
        subnet_file: String,
        lock: String,
        pid: Option<u32>,
    },
    #[error("lock file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
}

/// Held for the life of the agent; released when dropped or when the process exits.
pub struct InstanceLock {
    _lock: Flock<File>,
}

/// `<subnet-file>.lock`.
pub fn lock_path(subnet_file: &Path) -> PathBuf {
    let mut name = subnet_file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LockError + '_ {
    move |source| LockError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn open(path: &Path) -> Result<File, LockError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(path))?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(path))
}

fn held(subnet_file: &Path, path: &Path, mut file: File) -> LockError {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    LockError::Held {
        subnet_file: subnet_file.display().to_string(),
        lock: path.display().to_string(),
        pid: text.trim().parse().ok(),
    }
}

impl InstanceLock {
    /// Takes the lock for `subnet_file`, or says who holds it.
    pub fn acquire(subnet_file: &Path) -> Result<Self, LockError> {
        let path = lock_path(subnet_file);
        let file = open(&path)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(held(subnet_file, &path, file))
            }
            Err((_, e)) => return Err(io_err(&path)(e.into())),
        };
        lock.set_len(0).map_err(io_err(&path))?;
        lock.rewind().map_err(io_err(&path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io_err(&path))?;
        Ok(InstanceLock { _lock: lock })
    }

    /// `Err(Held)` while an agent runs with `subnet_file`; Ok when none does.
    pub fn check_free(subnet_file: &Path) -> Result<(), LockError> {
        let path = lock_path(subnet_file);
        if !path.exists() {
            return Ok(());
        }
        let file = File::open(&path).map_err(io_err(&path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(_) => Ok(()),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => Err(held(subnet_file, &path, file)),
            Err((_, e)) => Err(io_err(&path)(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_subnet_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("fl-lock-test-{}", std::process::id()));
        let file = dir.join("subnet.env");
        let first = InstanceLock::acquire(&file).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let e = InstanceLock::acquire(&file).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "another flanneld (pid {}) is running with --subnet-file {} (it holds {}.lock): stop it first, or give each network its own --subnet-file",
                std::process::id(),
                file.display(),
                file.display()
            )
        );
        assert!(InstanceLock::check_free(&file).is_err());
        drop(first);
        InstanceLock::check_free(&file).unwrap();
        let _again = InstanceLock::acquire(&file).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
