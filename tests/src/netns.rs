//! Named network namespaces (`ip netns`), deleted on drop together with the processes in them.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

use crate::Result;

/// Every namespace this harness makes starts with this, then our PID: `fl<pid>-...`.
pub const PREFIX: &str = "fl";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique tag for one test's namespaces: `fl<pid>x<n>`.
pub fn unique_tag() -> String {
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct Netns {
    pub name: String,
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Is `name` one of ours (`fl<pid>x...`) whose creating process is gone?
fn is_stale(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let Ok(pid) = digits.parse::<i32>() else {
        return false;
    };
    rest[digits.len()..].starts_with('x') && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove namespaces and bpffs pin dirs left by earlier runs of this harness whose process is gone.
pub fn remove_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if is_stale(name) {
                Netns {
                    name: name.to_owned(),
                }
                .destroy();
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in dir.flatten() {
            if is_stale(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        if name.len() > 40 {
            bail!("namespace name {name} too long");
        }
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A fresh namespace `fl<pid>x<n>-<what>`, after removing those of earlier runs whose
    /// process is gone.
    pub fn unique(what: &str) -> Result<Self> {
        remove_stale();
        Netns::create(&format!("{}-{what}", unique_tag()))
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A command that runs inside the namespace (nsenter keeps /sys/fs/bpf visible).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// Run a command inside the namespace, failing with its output if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.exec("ip", args)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Run `f` on a thread that has entered this namespace: sockets it opens live here.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::spawn(move || -> Result<T> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns")?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    /// `run_in` for test code, where not getting into the namespace is a test failure.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.run_in(f)
            .unwrap_or_else(|e| panic!("in namespace {}: {e:#}", self.name))
    }

    /// The interface index of device `name` in this namespace.
    pub fn ifindex(&self, name: &str) -> Result<u32> {
        let c = std::ffi::CString::new(name).context("device name")?;
        // SAFETY: NUL-terminated name.
        let idx = self.run_in(move || unsafe { libc::if_nametoindex(c.as_ptr()) })?;
        if idx == 0 {
            bail!("no device {name} in namespace {}", self.name);
        }
        Ok(idx)
    }

    /// Like `run_in`, but returns at once with a handle to join later.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        Ok(std::thread::spawn(move || -> Result<T> {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .context("setns")?;
            Ok(f())
        }))
    }

    /// Kill every process still inside and delete the namespace.
    pub fn destroy(&self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.destroy();
    }
}
