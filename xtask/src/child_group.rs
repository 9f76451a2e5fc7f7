//! Children xtask starts in a process group of their own (a VM: vng, virtme-run and qemu; a
//! test executable and the agents and etcd it starts), so a deadline can end each with all it
//! started. Such a group does not get the terminal's Ctrl-C: if xtask is interrupted, it ends
//! the groups it still has running itself, then dies of the signal as it would have.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use nix::libc;

/// Process group ids running now (0: free slot). Few: one VM or one test at a time.
static GROUPS: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];
static HANDLERS: Once = Once::new();

/// A running group, ended on SIGINT/SIGTERM/SIGHUP while this lives.
pub struct Registered(Option<usize>);

/// Registers the group `pgid` (the id of the child started with `process_group(0)`).
pub fn register(pgid: u32) -> Registered {
    HANDLERS.call_once(install_handlers);
    let Ok(pgid) = i32::try_from(pgid) else {
        return Registered(None);
    };
    let slot = GROUPS.iter().position(|g| {
        g.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    });
    Registered(slot)
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            GROUPS[i].store(0, Ordering::SeqCst);
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe calls here: kill(2), signal(2), raise(3).
    for g in &GROUPS {
        let pgid = g.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: killpg has no memory-safety preconditions.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
        }
    }
    // SAFETY: restoring the default action and re-raising ends us as the signal would have.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only makes async-signal-safe calls.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}
