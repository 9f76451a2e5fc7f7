//! Booting a kernel in a VM with this machine's own userland: virtme-ng (`vng`, pinned, in its
//! own virtualenv under `~/.cache/flannel-rs`) on qemu TCG (there is no KVM here).
//!
//! Debian's kernels have no built-in virtio-serial, so vng falls back to the console for the
//! guest command: its stdout is mixed with kernel messages and vng exits 255 even when the
//! command succeeded. Callers therefore never rely on vng's output or exit code: the guest
//! writes its results to files under the checkout (the root filesystem is shared, writable),
//! and the host reads those.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::kernels::Kernel;
use crate::setup_ebpf::cache_dir;
use crate::workspace::{root, run, target_dir};

/// virtme-ng release known to boot Debian's kernels here.
const VIRTME_NG_VERSION: &str = "1.42";

/// The guest's size: enough for etcd, four agents and their pods.
const MEMORY: &str = "2G";
const CPUS: &str = "2";

/// The virtualenv virtme-ng lives in (its own, so the machine's Python stays untouched; on the
/// shared root, where the guest finds virtme-ng's init).
pub fn virtme_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("virtme-ng"))
}

fn vng_bin() -> Result<PathBuf> {
    Ok(virtme_dir()?.join("bin/vng"))
}

fn vng_version() -> Option<String> {
    let out = Command::new(vng_bin().ok()?)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Installs virtme-ng `VIRTME_NG_VERSION` into its virtualenv unless it is there, then proves
/// it runs.
pub fn ensure_virtme_ng() -> Result<()> {
    let want = format!("virtme-ng {VIRTME_NG_VERSION}");
    if vng_version().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    let dir = virtme_dir()?;
    eprintln!("installing {want} into {}", dir.display());
    // Debian's python3 (package python3-venv): the same on every machine of this kind.
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&dir))
    .context("setup failed: creating the virtme-ng virtualenv (Debian package python3-venv)")?;
    run(Command::new(dir.join("bin/pip")).args([
        "install",
        "-q",
        "--disable-pip-version-check",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))
    .context("setup failed: pip install virtme-ng")?;
    match vng_version() {
        Some(v) if v == want => Ok(()),
        other => bail!(
            "setup check failed: {} --version says {other:?}, not {want:?}",
            vng_bin()?.display()
        ),
    }
}

/// How a VM run ended, as far as the host can tell (the guest's results are in its files).
pub enum Exit {
    /// qemu ended by itself (vng's exit code, meaningless with the console fallback).
    Ended,
    /// Still running at the deadline: killed.
    TimedOut,
}

/// Directories the guest does not share with the host: virtme-ng mounts them afresh there
/// (a tmpfs or an overlay whose writes stay in the guest).
const GUEST_PRIVATE: &[&str] = &["/tmp", "/run", "/var/tmp", "/var/cache"];

/// `--rwdir` for the checkout and the target dir where they are under a guest-private
/// directory (a CI clone in /tmp): the guest runs the test executables from there and writes
/// its results there.
fn private_shares() -> Vec<String> {
    let mut shares: Vec<PathBuf> = Vec::new();
    for dir in [root(), target_dir()] {
        let private = GUEST_PRIVATE.iter().any(|d| dir.starts_with(d));
        if private && !shares.iter().any(|s| dir.starts_with(s)) {
            shares.push(dir);
        }
    }
    shares
        .iter()
        .map(|d| format!("--rwdir={}", d.display()))
        .collect()
}

/// Boots `kernel` and runs `command` in it as root, with the host's root filesystem shared
/// writable. vng's console (kernel messages and the command's output) goes to `console_log`.
/// While it runs, `progress` is called every second (e.g. to report results as they land).
pub fn run_in_vm(
    kernel: &Kernel,
    command: &str,
    timeout: Duration,
    console_log: &Path,
    mut progress: impl FnMut(),
) -> Result<Exit> {
    let log =
        File::create(console_log).with_context(|| format!("creating {}", console_log.display()))?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![virtme_dir()?.join("bin")];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(vng_bin()?);
    cmd.arg("-r")
        .arg(kernel.vmlinuz())
        .args(["--disable-kvm", "--memory", MEMORY, "--cpus", CPUS])
        .args(["--rw", "--verbose", "--exec", command])
        .args(private_shares())
        // One host thread runs both vCPUs: with one thread per vCPU (MTTCG), Debian's 6.12
        // oopsed once in netif_rx_internal on an int3 the kernel had put there to patch a
        // static key (text_poke_bp), the other vCPU still running the old translation.
        .arg("--qemu-opts=-accel tcg,thread=single")
        // vng starts `virtme-run` from PATH: ours.
        .env("PATH", std::env::join_paths(dirs)?)
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: vng, virtme-run and qemu end together on a timeout.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", vng_bin().unwrap_or_default().display()))?;
    let _ended_if_interrupted = crate::child_group::register(child.id());
    let pgid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            progress();
            return Ok(Exit::Ended);
        }
        if Instant::now() >= deadline {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait();
            progress();
            return Ok(Exit::TimedOut);
        }
        progress();
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What the guest kernel said when it crashed, if it did: its first `Oops:`, `BUG:` or panic
/// line and where (`RIP:`).
pub fn guest_crash(console_log: &Path) -> Option<String> {
    crash_in(&std::fs::read_to_string(console_log).ok()?)
}

fn crash_in(text: &str) -> Option<String> {
    let body = |l: &str| l.split_once("] ").map_or(l, |(_, b)| b).trim().to_owned();
    let mut lines = text.lines();
    let first = lines
        .by_ref()
        .find(|l| l.contains("Oops:") || l.contains("BUG:") || l.contains("Kernel panic"))?;
    let mut out = body(first);
    if let Some(rip) = lines.find(|l| l.contains("RIP: 0010:")) {
        out.push_str(" at ");
        out.push_str(body(rip).trim_start_matches("RIP: 0010:"));
    }
    Some(out)
}

/// The last `n` lines of the console log, to show why a guest produced no results.
pub fn console_tail(console_log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(console_log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_oops_is_one_line_with_where() {
        let console = "\
[  171.591304] cni0: port 1(vethc2e06df8) entered forwarding state
[  176.464073] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[  176.464526] CPU: 0 UID: 0 PID: 1062 Comm: fl-tun-tx0 Not tainted 6.12.118+deb12-amd64 #1
[  176.464775] RIP: 0010:netif_rx_internal+0x1e/0x120
[  176.470606] Kernel panic - not syncing: Fatal exception in interrupt
";
        assert_eq!(
            crash_in(console).as_deref(),
            Some("Oops: int3: 0000 [#1] PREEMPT SMP NOPTI at netif_rx_internal+0x1e/0x120")
        );
        assert_eq!(crash_in("[    1.0] veth: loaded\n"), None);
    }
}
