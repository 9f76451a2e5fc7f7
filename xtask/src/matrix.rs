//! `cargo xtask test`: the legs of the test run and their report.
//!
//! A leg is the full host suite (`cargo test`), or the kernel selection (`SELECTION`) on one
//! kernel: a Debian kernel booted in a VM (`--kernel 5.10|6.1|6.12`) or this machine's kernel
//! (`--kernel host`). Every leg runs even when an earlier one failed; at the end each leg's test
//! count, failures and wall time are printed, and the command fails if any leg did (a leg that
//! ran no test counts as failed: nothing is skipped silently).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::guest_env;
use crate::kernels::{self, Kernel, Series};
use crate::libtest::{self, Outcome, Totals};
use crate::runner::{Plan, Results, Run};
use crate::vm;
use crate::workspace::{cargo, flanneld_release, root, target_dir};

/// One entry of the selection: a test target of `tests/tests/` and the tests of it to run.
pub struct Selected {
    pub target: &'static str,
    /// Exact test names, in the order they run; empty: all of the target's tests.
    pub tests: &'static [&'static str],
    /// Deadline inside a VM (several times what it took under TCG on a loaded machine); on
    /// this machine every run gets `HOST_RUN_TIMEOUT`.
    pub vm_timeout: Duration,
}

/// What every kernel leg runs, in this order: the smallest set that covers the eBPF data plane
/// on a kernel. Each leg boots under qemu TCG, where a test that builds namespaces and loads
/// the programs takes 20-40 s (about 50x this machine: every `ip`/`tc` process and every
/// aya load runs emulated), so this list is what keeps the VM leg of `cargo xtask test` short.
pub const SELECTION: &[Selected] = &[
    // Every program through this kernel's verifier (each test loads all five), the
    // BPF_PROG_TEST_RUN byte-exact and drop cases of each program, XDP decap and its mark,
    // traffic, GSO, checksums and a reload through real devices: the whole file.
    Selected {
        target: "ebpf_programs",
        tests: &[],
        vm_timeout: Duration::from_secs(900),
    },
    // Overlays of agents with CNI pods (netns, etcd): ping and hashed TCP between every pair
    // on TUN alone (tells a kernel that rejects the programs from one that breaks the
    // overlay), eBPF with TUN hosts (upstream's wire format) both ways, the bytes on the wire,
    // the guard against forged VXLAN, and classic TC asked for (TCX kernels).
    Selected {
        target: "udp_backend",
        tests: &[
            "tun_all_pairs_ping_and_tcp",
            "mixed_ebpf_and_tun_hosts_interoperate",
            "wire_format_is_upstreams",
            "a_pod_cannot_inject_vxlan_posing_as_a_peers_pod",
            "ebpf_with_classic_tc_all_pairs_ping_and_tcp_and_the_guard_holds",
        ],
        vm_timeout: Duration::from_secs(600),
    },
    // XDP decap where auto picks it (veth has native XDP) and the NIC-like underlay.
    Selected {
        target: "udp_dataplanes",
        tests: &[
            "ebpf_and_tun_hosts_talk_on_a_nic_underlay",
            "xdp_decap_hosts_talk_on_a_nic_underlay",
        ],
        vm_timeout: Duration::from_secs(400),
    },
    // The agent killed and restarted under a 100/s ping (TC decap, XDP decap, classic TC
    // asked for): pinned maps adopted, programs replaced in place, no packet lost; uninstall
    // removes exactly ours and a foreign filter keeps working.
    Selected {
        target: "operations",
        tests: &[
            "sigkill_and_restart_lose_no_packets_and_drop_peers_deleted_meanwhile",
            "sigkill_and_restart_with_xdp_decap_lose_no_packets",
            "sigkill_and_restart_with_classic_tc_lose_no_packets_and_replace_programs_in_place",
            "classic_tc_keeps_a_foreign_filter_working_and_uninstall_removes_only_ours",
            "dataplane_lists_peers_and_uninstall_removes_everything",
        ],
        vm_timeout: Duration::from_secs(900),
    },
];

/// The kernel leg plain `cargo xtask test` runs besides the full host suite: Debian stable's
/// kernel, without TCX (classic TC attach), the oldest most hosts run.
pub const DEFAULT_KERNEL: &str = "6.1";

/// How much longer the harness waits inside a VM (`FLANNEL_TEST_TIME_SCALE`): with the
/// machine loaded by other builds, three agents starting at once were not ready within the
/// harness's 20 s under TCG (5.10, and once 6.1).
const VM_TIME_SCALE: u32 = 4;

/// Per executable of the selection on this machine.
const HOST_RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Boot, guest setup and shutdown of a VM, on top of its runs.
const VM_OVERHEAD: Duration = Duration::from_secs(300);

/// Which kernel a selection leg runs on.
#[derive(Clone, Debug)]
pub enum Target {
    Vm(Kernel),
    Host,
}

/// `--kernel` values in the order the legs run: `all` is every series, then `host`.
pub fn parse_kernels(names: &[String]) -> Result<Vec<Option<Series>>> {
    let mut out: Vec<Option<Series>> = Vec::new();
    let mut add = |k: Option<Series>| {
        if !out.contains(&k) {
            out.push(k);
        }
    };
    for name in names {
        match name.as_str() {
            "all" => {
                kernels::SERIES.iter().for_each(|s| add(Some(*s)));
                add(None);
            }
            "host" => add(None),
            other => match kernels::series(other) {
                Some(s) => add(Some(s)),
                None => bail!(
                    "--kernel {other}: expected one of {}, host or all",
                    kernels::SERIES
                        .iter()
                        .map(|s| s.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
    Ok(out)
}

/// One leg's outcome.
pub struct LegReport {
    pub name: String,
    pub detail: String,
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    pub wall: Duration,
    /// (test, why) of each failed test.
    pub failures: Vec<(String, String)>,
    /// What went wrong with the leg itself (no boot, guest setup, timeout).
    pub error: Option<String>,
    pub logs: PathBuf,
    /// The path choices the agents logged on this kernel, each once.
    pub paths: Vec<String>,
}

impl LegReport {
    /// A leg that could not run at all (its kernel could not be fetched, ...).
    pub fn broken(name: &str, error: String) -> Self {
        LegReport {
            name: name.to_owned(),
            detail: String::new(),
            passed: 0,
            failed: 0,
            ignored: 0,
            wall: Duration::ZERO,
            failures: Vec::new(),
            error: Some(error),
            logs: target_dir().join("kernel-matrix"),
            paths: Vec::new(),
        }
    }

    pub fn ok(&self) -> bool {
        self.error.is_none() && self.failed == 0 && self.passed > 0
    }
}

/// The full host suite: `cargo test --release --no-fail-fast [args]`, its output passed through
/// and counted.
pub fn full_host_suite(args: &[String]) -> Result<LegReport> {
    let started = Instant::now();
    let mut child = cargo()
        .env("FLANNELD_BIN", flanneld_release())
        .args(["test", "--release", "--no-fail-fast"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut totals = Totals::default();
    let mut output = String::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.unwrap_or_default();
            println!("{line}");
            totals.add_line(&line);
            output.push_str(&line);
            output.push('\n');
        }
    }
    let status = child.wait()?;
    let failures = libtest::parse(&output, "did not finish")
        .into_iter()
        .filter(|c| c.outcome == Outcome::Failed)
        .map(|c| (c.name, c.reason.unwrap_or_default()))
        .collect();
    Ok(LegReport {
        name: "host, full suite".to_owned(),
        detail: format!("cargo test, {} test executables", totals.results),
        passed: totals.passed,
        failed: totals.failed,
        ignored: totals.ignored,
        wall: started.elapsed(),
        failures,
        error: (!status.success() && totals.failed == 0)
            .then(|| format!("cargo test failed ({status}) without a failed test: see above")),
        logs: PathBuf::from("(above)"),
        paths: Vec::new(),
    })
}

/// Builds the test executables (the same build `cargo test --release` uses) and returns the
/// path of each integration test target of flannel-tests.
pub fn test_executables() -> Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args(["test", "--release", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test executables failed: {}", out.status);
    }
    let mut exes = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_flannel_tests = v["package_id"]
            .as_str()
            .is_some_and(|p| p.contains("flannel-tests"));
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, true, Some(exe), Some(name)) = (
            is_flannel_tests,
            is_test,
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
        ) {
            exes.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

fn format_wall(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}

/// The names of the tests in test executable `exe` (`--list`, run here).
fn list_tests(exe: &Path) -> Result<Vec<String>> {
    let out = std::process::Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("listing the tests of {}", exe.display()))?;
    if !out.status.success() {
        bail!("{} --list failed: {}", exe.display(), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// The selection as test runs: one per entry, tests one at a time (2 vCPUs under TCG, and
/// plain output to parse). `only` (from `cargo xtask test --kernel K -- NAME...`) keeps the
/// tests whose name contains one of its words; an entry left with none is not run.
fn selection_runs(exes: &[(String, PathBuf)], vm: bool, only: &[String]) -> Result<Vec<Run>> {
    let mut runs = Vec::new();
    for sel in SELECTION {
        let exe = exes
            .iter()
            .find(|(n, _)| n == sel.target)
            .map(|(_, p)| p.clone())
            .with_context(|| format!("no test executable for tests/tests/{}.rs", sel.target))?;
        let matches = |t: &str| only.is_empty() || only.iter().any(|o| t.contains(o.as_str()));
        let (name, mut args) = if sel.tests.is_empty() && only.is_empty() {
            (sel.target.to_owned(), Vec::new())
        } else {
            let listed;
            let all: Vec<&str> = if sel.tests.is_empty() {
                listed = list_tests(&exe)?;
                listed.iter().map(String::as_str).collect()
            } else {
                sel.tests.to_vec()
            };
            let tests: Vec<&str> = all.into_iter().filter(|t| matches(t)).collect();
            if tests.is_empty() {
                continue;
            }
            let name = match tests.as_slice() {
                [one] => format!("{}.{one}", sel.target),
                _ => sel.target.to_owned(),
            };
            let mut args = vec!["--exact".to_owned()];
            args.extend(tests.iter().map(|t| (*t).to_owned()));
            (name, args)
        };
        args.push("--test-threads=1".to_owned());
        runs.push(Run {
            name,
            exe,
            args,
            timeout: if vm { sel.vm_timeout } else { HOST_RUN_TIMEOUT },
        });
    }
    if runs.is_empty() {
        bail!("no test of the kernel selection matches {}", only.join(" "));
    }
    Ok(runs)
}

fn plan(target: &Target, dir: &Path, runs: Vec<Run>) -> Result<Plan> {
    let vm = matches!(target, Target::Vm(_));
    let mut env = vec![(
        "FLANNELD_BIN".to_owned(),
        flanneld_release().to_string_lossy().into_owned(),
    )];
    if let Ok(u) = std::env::var("FLANNEL_TEST_UNDERLAY") {
        env.push(("FLANNEL_TEST_UNDERLAY".to_owned(), u));
    }
    if vm {
        // Symbolizing a backtrace from these executables' debug info takes seconds per failed
        // test under TCG; the panic message is in the log either way.
        env.push(("RUST_BACKTRACE".to_owned(), "0".to_owned()));
        // The harness's deadlines are for this machine; TCG is 5-20x slower.
        env.push((
            "FLANNEL_TEST_TIME_SCALE".to_owned(),
            VM_TIME_SCALE.to_string(),
        ));
    }
    env.push((
        "FLANNEL_TEST_PATHS_FILE".to_owned(),
        dir.join(PATHS_FILE).to_string_lossy().into_owned(),
    ));
    Ok(Plan {
        dir: dir.to_path_buf(),
        prepare_guest: vm,
        ram_files: if vm {
            guest_env::ram_files(&flanneld_release())?
        } else {
            Vec::new()
        },
        cwd: root().join("tests"),
        env,
        runs,
    })
}

/// The selection on `target`, its files in `target/kernel-matrix/<release or host>/`.
pub fn selection_leg(
    target: &Target,
    exes: &[(String, PathBuf)],
    only: &[String],
) -> Result<LegReport> {
    let (name, detail, leg_dir_name) = match target {
        Target::Vm(k) => (
            k.series.name.to_owned(),
            format!("{} ({} {}), VM", k.release, k.series.suite, k.version),
            k.release.clone(),
        ),
        Target::Host => (
            "host".to_owned(),
            format!("{}, this machine", kernel_release()),
            "host".to_owned(),
        ),
    };
    let dir = target_dir().join("kernel-matrix").join(&leg_dir_name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let vm = matches!(target, Target::Vm(_));
    let plan = plan(target, &dir, selection_runs(exes, vm, only)?)?;
    plan.write()?;

    println!(
        "\n== kernel leg {name}: {detail}; files in {}",
        dir.display()
    );
    let started = Instant::now();
    let mut error = run_plan_on(target, &plan, &name)?;
    let wall = started.elapsed();
    let results = Results::read(&dir);
    let console_log = dir.join("console.log");
    if let Some(crash) = vm::guest_crash(&console_log) {
        error = Some(format!("the guest kernel crashed: {crash}"));
    }
    match &results {
        None => {
            error.get_or_insert_with(|| {
                format!(
                    "the guest wrote no results (did not boot or did not start the runner); \
                     last console lines:\n{}",
                    vm::console_tail(&console_log, 15)
                )
            });
        }
        Some(r) if r.environment_error.is_some() => error = r.environment_error.clone(),
        Some(r) if !r.finished => {
            error.get_or_insert_with(|| {
                format!(
                    "the guest stopped after {} of {} test runs; last console lines:\n{}",
                    r.runs.len(),
                    plan.runs.len(),
                    vm::console_tail(&console_log, 15)
                )
            });
        }
        Some(_) => {}
    }
    let detail = match (&results, target) {
        (Some(r), Target::Vm(k)) => {
            if r.kernel != k.release {
                error.get_or_insert_with(|| {
                    format!("the VM booted {}, not {}", r.kernel, k.release)
                });
            }
            let steps: Vec<String> = r
                .prepare
                .iter()
                .map(|(step, d)| format!("{step} {:.0} s", d.as_secs_f64()))
                .collect();
            format!(
                "{detail}: boot {:.0} s, {}",
                r.uptime_at_start.as_secs_f64(),
                steps.join(", ")
            )
        }
        _ => detail,
    };
    let cases: Vec<_> = results
        .iter()
        .flat_map(|r| r.runs.iter())
        .flat_map(|r| r.cases.iter())
        .collect();
    let count = |o| cases.iter().filter(|c| c.outcome == o).count() as u32;
    Ok(LegReport {
        name,
        detail,
        passed: count(Outcome::Passed),
        failed: count(Outcome::Failed),
        ignored: count(Outcome::Ignored),
        wall,
        failures: cases
            .iter()
            .filter(|c| c.outcome == Outcome::Failed)
            .map(|c| (c.name.clone(), c.reason.clone().unwrap_or_default()))
            .collect(),
        error,
        paths: recorded_paths(&dir.join(PATHS_FILE)),
        logs: dir,
    })
}

/// Where the harness appends the agents' path choices (`FLANNEL_TEST_PATHS_FILE`), in a leg's
/// directory.
const PATHS_FILE: &str = "paths.log";

/// The distinct lines of the paths file, in the order first logged; the interface names and
/// reasons stay (they say why).
fn recorded_paths(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut seen = Vec::new();
    for line in text.lines() {
        if !seen.iter().any(|l: &String| l == line) {
            seen.push(line.to_owned());
        }
    }
    seen
}

/// Runs `plan` here or in a VM, printing each test run's outcome as it lands. Returns what
/// went wrong with the VM itself, if anything (the tests' outcomes are in `results.json`).
fn run_plan_on(target: &Target, plan: &Plan, leg: &str) -> Result<Option<String>> {
    let mut shown = 0;
    let mut show_progress = || {
        if let Some(r) = Results::read(&plan.dir) {
            for run in r.runs.iter().skip(shown) {
                let count = |o| run.cases.iter().filter(|c| c.outcome == o).count();
                println!(
                    "[{leg}] {}: {} passed, {} failed ({:.0} s)",
                    run.name,
                    count(Outcome::Passed),
                    count(Outcome::Failed),
                    run.wall.as_secs_f64()
                );
            }
            shown = r.runs.len();
        }
    };
    let Target::Vm(kernel) = target else {
        crate::runner::run_plan(&Plan::path(&plan.dir))?;
        show_progress();
        return Ok(None);
    };
    // A copy: rebuilding xtask while the guest runs must not pull it from under it.
    let exe = plan.dir.join("xtask");
    std::fs::copy(
        std::env::current_exe().context("locating the xtask executable")?,
        &exe,
    )
    .with_context(|| format!("copying xtask to {}", exe.display()))?;
    let command = format!(
        "'{}' guest-run '{}'",
        exe.display(),
        Plan::path(&plan.dir).display()
    );
    let timeout = plan.runs.iter().map(|r| r.timeout).sum::<Duration>() + VM_OVERHEAD;
    let console_log = plan.dir.join("console.log");
    match vm::run_in_vm(kernel, &command, timeout, &console_log, &mut show_progress)? {
        vm::Exit::Ended => Ok(None),
        vm::Exit::TimedOut => Ok(Some(format!(
            "the VM was still running after {} s: killed",
            timeout.as_secs()
        ))),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown kernel".to_owned())
}

/// Prints every leg's count, failures and wall time; an error if any leg failed.
pub fn report(legs: &[LegReport]) -> Result<()> {
    println!("\n== test legs");
    println!(
        "{:<18} {:>6} {:>7} {:>7} {:>8} {:>9}  kernel",
        "leg", "tests", "passed", "failed", "ignored", "wall"
    );
    for l in legs {
        println!(
            "{:<18} {:>6} {:>7} {:>7} {:>8} {:>9}  {}{}",
            l.name,
            l.passed + l.failed,
            l.passed,
            l.failed,
            l.ignored,
            format_wall(l.wall),
            l.detail,
            if l.ok() { "" } else { "  FAILED" }
        );
    }
    for l in legs.iter().filter(|l| !l.paths.is_empty()) {
        println!("\n-- paths the agents chose on {}:", l.name);
        for p in &l.paths {
            println!("   {p}");
        }
    }
    for l in legs.iter().filter(|l| !l.ok()) {
        println!("\n-- {} failed (logs: {})", l.name, l.logs.display());
        if let Some(e) = &l.error {
            println!("   leg: {e}");
        }
        if l.passed + l.failed == 0 && l.error.is_none() {
            println!("   no test ran");
        }
        // Failures with the same reason together (a verifier rejection fails every test
        // that loads the programs).
        let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
        for (test, why) in &l.failures {
            match reasons.iter_mut().find(|(r, _)| r == why) {
                Some((_, tests)) => tests.push(test),
                None => reasons.push((why, vec![test])),
            }
        }
        for (why, tests) in reasons {
            if tests.len() == 1 {
                println!("   {}: {why}", tests[0]);
            } else {
                println!("   {} tests ({}): {why}", tests.len(), tests.join(", "));
            }
        }
    }
    let failed: Vec<&str> = legs
        .iter()
        .filter(|l| !l.ok())
        .map(|l| l.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("test legs failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(args: &[&str]) -> Result<Vec<&'static str>> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        Ok(parse_kernels(&args)?
            .into_iter()
            .map(|k| k.map_or("host", |s| s.name))
            .collect())
    }

    #[test]
    fn kernel_legs_in_order_without_repeats() {
        assert_eq!(names(&["all"]).unwrap(), ["5.10", "6.1", "6.12", "host"]);
        assert_eq!(names(&["6.12", "host", "6.12"]).unwrap(), ["6.12", "host"]);
        let err = names(&["4.19"]).unwrap_err().to_string();
        assert!(
            err.contains("--kernel 4.19: expected one of 5.10, 6.1, 6.12"),
            "{err}"
        );
    }
}
