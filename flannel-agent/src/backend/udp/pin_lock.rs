//! One agent per `--bpf-pin-dir`: an exclusive flock on the directory for as long as the agent
//! runs, and a marker naming the network namespace whose interfaces the pinned programs are
//! attached to. A second agent (or one in another namespace) would otherwise adopt the first's
//! links, overwrite its config map and detach its programs.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A symlink in the pin dir (bpffs holds no regular files) whose target is the namespace's
/// identity as the kernel prints it, e.g. `net:[4026532301]`.
pub const NETNS_MARKER: &str = "flannel_netns";

#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    #[error(
        "--bpf-pin-dir {0} is in use by another running flanneld: give each agent its own pin dir"
    )]
    Busy(PathBuf),
    #[error("--bpf-pin-dir {dir} holds the data plane of network namespace {theirs}, but this flanneld runs in {ours}: give each agent its own pin dir (or remove the old one with `flanneld uninstall`)")]
    OtherNamespace {
        dir: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: String) -> impl FnOnce(io::Error) -> PinLockError {
    move |source| PinLockError::Io { context, source }
}

/// Held while the agent runs; the kernel drops the lock when the process ends (even kill -9).
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

impl PinDirLock {
    /// Lock `pin_dir` and check (or record) its namespace. `Ok(None)` when the directory does
    /// not exist and cannot be made yet (bpffs not mounted: the loader mounts it; call again).
    pub fn acquire(pin_dir: &Path) -> Result<Option<Self>, PinLockError> {
        if !pin_dir.exists() && std::fs::create_dir_all(pin_dir).is_err() {
            return Ok(None);
        }
        let dir = File::open(pin_dir).map_err(io_err(format!("opening {}", pin_dir.display())))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                PinLockError::Busy(pin_dir.to_path_buf())
            } else {
                io_err(format!("locking {}", pin_dir.display()))(e)
            });
        }
        check_namespace(pin_dir)?;
        Ok(Some(PinDirLock { _dir: dir }))
    }
}

/// This thread's network namespace (threads may have entered another one than the process).
fn current_netns() -> Result<String, PinLockError> {
    let link = "/proc/thread-self/ns/net";
    std::fs::read_link(link)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(io_err(format!("reading {link}")))
}

/// Which network namespace the data plane pinned in a directory belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinnedNamespace {
    /// This thread's.
    This,
    /// Another one (`theirs`), not this thread's (`ours`).
    Other { theirs: String, ours: String },
    /// Not recorded (no marker: not pinned by an agent), or unreadable.
    Unknown,
}

/// Whose data plane `pin_dir` holds, by the marker an agent writes there.
pub fn pinned_namespace(pin_dir: &Path) -> PinnedNamespace {
    let (Ok(theirs), Ok(ours)) = (
        std::fs::read_link(pin_dir.join(NETNS_MARKER)),
        current_netns(),
    ) else {
        return PinnedNamespace::Unknown;
    };
    let theirs = theirs.to_string_lossy().into_owned();
    if theirs == ours {
        PinnedNamespace::This
    } else {
        PinnedNamespace::Other { theirs, ours }
    }
}

fn check_namespace(pin_dir: &Path) -> Result<(), PinLockError> {
    let ours = current_netns()?;
    let marker = pin_dir.join(NETNS_MARKER);
    match std::fs::read_link(&marker) {
        Ok(theirs) => {
            let theirs = theirs.to_string_lossy().into_owned();
            if theirs != ours {
                return Err(PinLockError::OtherNamespace {
                    dir: pin_dir.to_path_buf(),
                    theirs,
                    ours,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::os::unix::fs::symlink(&ours, &marker)
            .map_err(io_err(format!("creating {}", marker.display()))),
        Err(e) => Err(io_err(format!("reading {}", marker.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_other_namespace_is_named() {
        let dir = std::env::temp_dir().join(format!("flannel-pinlock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = PinDirLock::acquire(&dir).unwrap().expect("dir created");
        assert!(matches!(
            PinDirLock::acquire(&dir),
            Err(PinLockError::Busy(_))
        ));
        drop(first);
        let again = PinDirLock::acquire(&dir)
            .unwrap()
            .expect("lock after release");
        drop(again);
        let marker = dir.join(NETNS_MARKER);
        std::fs::remove_file(&marker).unwrap();
        std::os::unix::fs::symlink("net:[1]", &marker).unwrap();
        let err = PinDirLock::acquire(&dir).unwrap_err();
        assert!(err.to_string().contains("net:[1]"), "{err}");
        assert!(matches!(
            pinned_namespace(&dir),
            PinnedNamespace::Other { theirs, .. } if theirs == "net:[1]"
        ));
        std::fs::remove_file(&marker).unwrap();
        assert_eq!(pinned_namespace(&dir), PinnedNamespace::Unknown);
        drop(PinDirLock::acquire(&dir).unwrap());
        assert_eq!(pinned_namespace(&dir), PinnedNamespace::This);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
