//! Project commands: `cargo xtask <setup|build-ebpf|build|test|demo|bench>`.
//!
//! `test` and `demo` set up a fresh machine themselves (apt packages, bpffs, rust-src,
//! bpf-linker), idempotently, then build and run.

mod bench;
mod build_ebpf;
mod child_group;
mod demo;
mod guest_env;
mod kernels;
mod libtest;
mod matrix;
mod runner;
mod setup;
mod setup_ebpf;
mod vm;
mod workspace;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use workspace::{cargo, flanneld_release, run};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, bpffs, rust-src, bpf-linker),
    /// then check each piece by using it once.
    Setup {
        /// First make this machine fresh (purge the packages setup installs, remove the cached
        /// bpf-linker), then set up, run the demo and one test file, and time each step.
        #[arg(long)]
        from_scratch: bool,
    },
    /// Build the eBPF object (nightly, build-std=core, bpf-linker, BTF).
    BuildEbpf {
        /// Debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build the eBPF object and `target/release/flanneld` with it embedded.
    Build,
    /// Set up, build, then run every test (unit, BPF_PROG_TEST_RUN, netns + etcd integration)
    /// on this machine. With --kernel: only the kernel selection (eBPF programs, udp netns
    /// tests), on the kernels named (Debian's in a VM, or this one).
    Test {
        /// Run the kernel selection on this kernel (repeatable): 5.10, 6.1, 6.12 (Debian's, in
        /// a qemu VM), host (this machine's), or all.
        #[arg(long = "kernel", value_name = "KERNEL")]
        kernels: Vec<String>,
        /// After `--`: extra arguments for `cargo test` of the full suite (e.g. a test name
        /// filter), or with --kernel, words that narrow the kernel selection to the tests
        /// whose names contain one of them.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Inside a kernel-matrix VM: prepare the guest and run the plan's test executables
    /// (started by `test --kernel`).
    #[command(hide = true)]
    GuestRun { plan: PathBuf },
    /// Set up, build, then bring up a demo cluster (etcd + three hosts in namespaces).
    Demo,
    /// Set up, build, then measure throughput and latency of every data path (table with ratios).
    Bench {
        /// Interleaved rounds (medians are reported).
        #[arg(long, default_value = "3")]
        rounds: u32,
        /// Seconds per iperf3 run.
        #[arg(long, default_value = "5")]
        seconds: u32,
        /// Only the scale figures (1000 leases, change rate, memory).
        #[arg(long)]
        scale_only: bool,
        /// Underlay modes to measure (repeatable): veth, nic. Default: both.
        #[arg(long, value_parser = ["veth", "nic"])]
        underlay: Vec<String>,
        /// Data paths to measure besides bare routing (repeatable); default: all, plus the
        /// scale figures.
        #[arg(long, value_parser = bench::PATH_NAMES)]
        path: Vec<String>,
    },
}

fn build_all() -> Result<()> {
    build_ebpf::run(true)?;
    run(cargo().args(["build", "--release", "-p", "flannel-agent"]))
}

/// Plain: lints, the full host suite and the default kernel leg. With `--kernel`: only the
/// kernel legs named, their selection narrowed by `args`. Every leg runs; the report at the end says which failed.
fn test(kernels: &[String], args: &[String]) -> Result<()> {
    let full_suite = kernels.is_empty();
    // Plain: the full suite here, then the default kernel leg (the oldest kernel most hosts
    // run, without TCX) in a VM, a few minutes under TCG. Arguments after `--` narrow the
    // full suite to what was asked for, without the VM leg.
    let legs = if full_suite && !args.is_empty() {
        Vec::new()
    } else if full_suite {
        matrix::parse_kernels(&[matrix::DEFAULT_KERNEL.to_owned()])?
    } else {
        matrix::parse_kernels(kernels)?
    };
    setup::ensure()?;
    build_all()?;
    if full_suite {
        run(cargo().args(["fmt", "--all", "--check"]))?;
        run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    let exes = if legs.is_empty() {
        Vec::new()
    } else {
        matrix::test_executables()?
    };
    let only: &[String] = if full_suite { &[] } else { args };
    let mut reports = Vec::new();
    if full_suite {
        reports.push(matrix::full_host_suite(args)?);
    }
    for leg in legs {
        let report = match leg {
            None => matrix::selection_leg(&matrix::Target::Host, &exes, only),
            Some(series) => kernels::ensure(series)
                .and_then(|k| matrix::selection_leg(&matrix::Target::Vm(k), &exes, only)),
        };
        reports.push(report.unwrap_or_else(|e| {
            matrix::LegReport::broken(leg.map_or("host", |s| s.name), format!("{e:#}"))
        }));
    }
    matrix::report(&reports)
}

/// `setup --from-scratch`: the check that does not depend on what happens to be installed.
fn from_scratch() -> Result<()> {
    let t = std::time::Instant::now();
    let removed = setup::purge()?;
    let purge_s = t.elapsed().as_secs();
    let t = std::time::Instant::now();
    setup::ensure()?;
    let setup_s = t.elapsed().as_secs();
    let t = std::time::Instant::now();
    build_all()?;
    let build_s = t.elapsed().as_secs();
    let t = std::time::Instant::now();
    demo::run(&flanneld_release())?;
    let demo_s = t.elapsed().as_secs();
    let t = std::time::Instant::now();
    run(cargo().env("FLANNELD_BIN", flanneld_release()).args([
        "test",
        "--release",
        "-p",
        "flannel-tests",
        "--test",
        "first_contact",
    ]))?;
    let test_s = t.elapsed().as_secs();
    println!("\n== setup --from-scratch");
    println!(
        "removed: {}",
        if removed.is_empty() {
            "nothing (already fresh)".to_owned()
        } else {
            removed.join(", ")
        }
    );
    println!(
        "purge {purge_s} s, setup {setup_s} s, build {build_s} s, demo {demo_s} s, tests/first_contact.rs {test_s} s"
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup {
            from_scratch: false,
        } => setup::ensure(),
        Cmd::Setup { from_scratch: true } => from_scratch(),
        Cmd::BuildEbpf { debug } => build_ebpf::run(!debug),
        Cmd::Build => {
            setup::ensure()?;
            build_all()
        }
        Cmd::Test { kernels, args } => test(&kernels, &args),
        Cmd::GuestRun { plan } => runner::run_plan(&plan),
        Cmd::Demo => {
            setup::ensure()?;
            build_all()?;
            demo::run(&flanneld_release())
        }
        Cmd::Bench {
            rounds,
            seconds,
            scale_only,
            underlay,
            path,
        } => {
            setup::ensure()?;
            build_all()?;
            if scale_only {
                bench::scale(&flanneld_release())
            } else {
                let underlays: Vec<flannel_tests::Underlay> = if underlay.is_empty() {
                    flannel_tests::Underlay::ALL.to_vec()
                } else {
                    flannel_tests::Underlay::ALL
                        .into_iter()
                        .filter(|u| underlay.iter().any(|n| n == u.name()))
                        .collect()
                };
                bench::run(&flanneld_release(), &underlays, &path, rounds, seconds)
            }
        }
    }
}
