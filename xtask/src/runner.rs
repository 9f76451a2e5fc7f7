//! Runs one leg's prebuilt test executables where it is started (inside a kernel-matrix VM as
//! `xtask guest-run <plan>`, or on this machine for the `host` leg) and writes what happened
//! to `results.json` beside the plan after every executable, so the host can follow along and
//! still knows how far a guest got if it dies.
//!
//! Files, all in the leg's directory under the checkout's target dir (the guest's /tmp, /run
//! and /var/cache are its own tmpfs; the checkout is shared):
//! `plan.json` (written by the host), `<run>.log` (an executable's output), `results.json`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::guest_env;
use crate::libtest::{self, TestCase};

/// One test executable to run: `exe args...` with a deadline.
#[derive(Clone, Debug)]
pub struct Run {
    /// Names its log file and its line in the report (e.g. `udp_backend` or `ebpf_programs`).
    pub name: String,
    pub exe: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
}

/// What the host hands a runner.
#[derive(Clone, Debug)]
pub struct Plan {
    pub dir: PathBuf,
    /// Load modules, mount bpffs, set sysctls first (a bare VM kernel).
    pub prepare_guest: bool,
    /// With `prepare_guest`: files to keep in the guest's RAM (see `guest_env`).
    pub ram_files: Vec<PathBuf>,
    /// Working directory of the executables (cargo runs them in their package's dir).
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    pub runs: Vec<Run>,
}

impl Plan {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("plan.json")
    }

    pub fn write(&self) -> Result<()> {
        let v = json!({
            "dir": self.dir,
            "prepare_guest": self.prepare_guest,
            "ram_files": self.ram_files,
            "cwd": self.cwd,
            "env": self.env,
            "runs": self.runs.iter().map(|r| json!({
                "name": r.name, "exe": r.exe, "args": r.args, "timeout_s": r.timeout.as_secs(),
            })).collect::<Vec<_>>(),
        });
        write_atomic(&Plan::path(&self.dir), &v)
    }

    pub fn read(path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )?;
        let s = |v: &Value| {
            v.as_str()
                .map(str::to_owned)
                .context("plan: string expected")
        };
        Ok(Plan {
            dir: PathBuf::from(s(&v["dir"])?),
            prepare_guest: v["prepare_guest"].as_bool().unwrap_or(false),
            ram_files: v["ram_files"]
                .as_array()
                .context("plan: ram_files")?
                .iter()
                .map(|f| s(f).map(PathBuf::from))
                .collect::<Result<_>>()?,
            cwd: PathBuf::from(s(&v["cwd"])?),
            env: v["env"]
                .as_array()
                .context("plan: env")?
                .iter()
                .map(|p| Ok((s(&p[0])?, s(&p[1])?)))
                .collect::<Result<_>>()?,
            runs: v["runs"]
                .as_array()
                .context("plan: runs")?
                .iter()
                .map(|r| {
                    Ok(Run {
                        name: s(&r["name"])?,
                        exe: PathBuf::from(s(&r["exe"])?),
                        args: r["args"]
                            .as_array()
                            .context("plan: args")?
                            .iter()
                            .map(s)
                            .collect::<Result<_>>()?,
                        timeout: Duration::from_secs(r["timeout_s"].as_u64().unwrap_or(600)),
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// What one executable did.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub name: String,
    pub log: PathBuf,
    /// Exit code; `None` when killed (timeout or signal).
    pub exit: Option<i32>,
    pub timed_out: bool,
    pub wall: Duration,
    pub cases: Vec<TestCase>,
}

/// `results.json`: the kernel the runner saw, whether the guest could be prepared, each run.
#[derive(Clone, Debug, Default)]
pub struct Results {
    pub kernel: String,
    /// The kernel's uptime when the runner started (in a VM: how long the boot took).
    pub uptime_at_start: Duration,
    /// How long preparing the guest took, step by step.
    pub prepare: Vec<(String, Duration)>,
    /// Why the guest could not be prepared (then nothing ran).
    pub environment_error: Option<String>,
    pub runs: Vec<RunResult>,
    pub finished: bool,
}

impl Results {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("results.json")
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let v = json!({
            "kernel": self.kernel,
            "uptime_at_start_s": self.uptime_at_start.as_secs_f64(),
            "prepare_s": self.prepare.iter().map(|(step, d)| json!([step, d.as_secs_f64()])).collect::<Vec<_>>(),
            "environment_error": self.environment_error,
            "finished": self.finished,
            "runs": self.runs.iter().map(|r| json!({
                "name": r.name, "log": r.log, "exit": r.exit, "timed_out": r.timed_out,
                "wall_s": r.wall.as_secs_f64(),
                "cases": r.cases.iter().map(TestCase::to_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        write_atomic(&Results::path(dir), &v)
    }

    /// `None` if there is no (complete) file yet.
    pub fn read(dir: &Path) -> Option<Self> {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(Results::path(dir)).ok()?).ok()?;
        Some(Results {
            kernel: v["kernel"].as_str().unwrap_or_default().to_owned(),
            uptime_at_start: Duration::from_secs_f64(
                v["uptime_at_start_s"].as_f64().unwrap_or(0.0),
            ),
            prepare: v["prepare_s"]
                .as_array()
                .map(|steps| {
                    steps
                        .iter()
                        .filter_map(|s| {
                            let d = Duration::from_secs_f64(s[1].as_f64()?);
                            Some((s[0].as_str()?.to_owned(), d))
                        })
                        .collect()
                })
                .unwrap_or_default(),
            environment_error: v["environment_error"].as_str().map(str::to_owned),
            finished: v["finished"].as_bool().unwrap_or(false),
            runs: v["runs"]
                .as_array()?
                .iter()
                .map(|r| RunResult {
                    name: r["name"].as_str().unwrap_or_default().to_owned(),
                    log: PathBuf::from(r["log"].as_str().unwrap_or_default()),
                    exit: r["exit"].as_i64().map(|c| c as i32),
                    timed_out: r["timed_out"].as_bool().unwrap_or(false),
                    wall: Duration::from_secs_f64(r["wall_s"].as_f64().unwrap_or(0.0)),
                    cases: r["cases"]
                        .as_array()
                        .map(|cs| cs.iter().filter_map(TestCase::from_json).collect())
                        .unwrap_or_default(),
                })
                .collect(),
        })
    }
}

fn write_atomic(path: &Path, v: &Value) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Runs the plan at `plan_path`; the outcome is in `results.json` (an error here means the
/// results could not be written).
pub fn run_plan(plan_path: &Path) -> Result<()> {
    let plan = Plan::read(plan_path)?;
    let mut results = Results {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        uptime_at_start: std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
            .map(Duration::from_secs_f64)
            .unwrap_or_default(),
        ..Results::default()
    };
    results.write(&plan.dir)?;
    if plan.prepare_guest {
        match guest_env::prepare(&plan.ram_files) {
            Ok(steps) => {
                results.prepare = steps.into_iter().map(|(s, d)| (s.to_owned(), d)).collect();
                results.write(&plan.dir)?;
            }
            Err(e) => {
                results.environment_error = Some(format!("{e:#}"));
                results.finished = true;
                return results.write(&plan.dir);
            }
        }
    }
    for run in &plan.runs {
        let r = run_one(&plan, run)?;
        results.runs.push(r);
        results.write(&plan.dir)?;
    }
    results.finished = true;
    results.write(&plan.dir)
}

fn run_one(plan: &Plan, run: &Run) -> Result<RunResult> {
    let log_path = plan.dir.join(format!("{}.log", run.name));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    let spawned = Command::new(&run.exe)
        .args(&run.args)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own group: on a timeout the test and everything it started are killed.
        .process_group(0)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Ok(RunResult {
                name: run.name.clone(),
                log: log_path,
                exit: None,
                timed_out: false,
                wall: started.elapsed(),
                cases: vec![TestCase {
                    name: run.name.clone(),
                    outcome: libtest::Outcome::Failed,
                    reason: Some(format!("cannot start {}: {e}", run.exe.display())),
                }],
            })
        }
    };
    let _ended_if_interrupted = crate::child_group::register(child.id());
    let deadline = started + run.timeout;
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait()? {
            break (Some(st), false);
        }
        if Instant::now() >= deadline {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = started.elapsed();
    let output =
        String::from_utf8_lossy(&std::fs::read(&log_path).unwrap_or_default()).into_owned();
    let unfinished = if timed_out {
        format!(
            "timed out: {} killed after {} s",
            run.name,
            run.timeout.as_secs()
        )
    } else {
        format!("{} ended during the test ({status:?})", run.name)
    };
    let mut cases = libtest::parse(&output, &unfinished);
    let exit = status.and_then(|s| s.code());
    // An executable that failed without reporting a failed test (did not start its tests,
    // crashed between them) fails as a whole: never counted as passed.
    let reported_failure = cases.iter().any(|c| c.outcome == libtest::Outcome::Failed);
    if exit == Some(0) && cases.is_empty() {
        // A filter that matches nothing passes: that would be a test skipped silently.
        cases.push(TestCase {
            name: format!("{} (executable)", run.name),
            outcome: libtest::Outcome::Failed,
            reason: Some(format!(
                "no test ran ({} matched nothing)",
                run.args.join(" ")
            )),
        });
    } else if exit != Some(0) && !reported_failure {
        let last = output
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        cases.push(TestCase {
            name: format!("{} (executable)", run.name),
            outcome: libtest::Outcome::Failed,
            reason: Some(if timed_out {
                unfinished
            } else {
                format!(
                    "exited with {status:?}; last line: {}",
                    libtest::truncate(last, 200)
                )
            }),
        });
    }
    Ok(RunResult {
        name: run.name.clone(),
        log: log_path,
        exit,
        timed_out,
        wall,
        cases,
    })
}
