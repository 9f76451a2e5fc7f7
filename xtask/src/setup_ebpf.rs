//! Installs what building the eBPF object needs, idempotently (CI runs it on a clean clone):
//! nightly's `rust-src` (for `-Z build-std=core`) and `bpf-linker`, built against the nightly
//! toolchain's own libLLVM so no system LLVM is needed.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::workspace::run;

/// bpf-linker version known to work with the pinned aya-ebpf and nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// `$HOME/.cache/flannel-rs`: where the toolchain pieces live, shared by all checkouts.
pub fn cache_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/flannel-rs"))
}

/// Directory to put in front of PATH so cargo finds `bpf-linker`.
pub fn bpf_linker_bin_dir() -> Result<PathBuf> {
    Ok(cache_dir()?.join("bpf-linker/bin"))
}

/// Makes sure `cargo +nightly build --target bpfel-unknown-none -Z build-std=core` can run.
pub fn ensure_toolchain() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    let (llvm_prefix, llvm_major) = ensure_llvm_prefix(&sysroot)?;
    ensure_bpf_linker(&llvm_prefix, llvm_major)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = || {
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()
            .context("running `rustc +nightly --print sysroot` (is rustup installed?)")
    };
    let mut out = sysroot()?;
    if !out.status.success() {
        // A fresh machine may have stable only: the BPF target needs nightly (build-std).
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        out = sysroot()?;
    }
    if !out.status.success() {
        bail!(
            "no nightly toolchain (`rustc +nightly` failed: {}); install it with `rustup toolchain install nightly`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// A prefix whose `lib/` holds `libLLVM.so` and the versioned name, both pointing at nightly's
/// own libLLVM: bpf-linker's build looks for the first, its binary loads the second.
fn ensure_llvm_prefix(sysroot: &Path) -> Result<(PathBuf, u32)> {
    let lib_dir = sysroot.join("lib");
    // The real library is `libLLVM.so.<major>.<minor>-rust-<version>` (also its SONAME);
    // `libLLVM-<major>-rust-<version>.so` next to it is only a linker script pointing at it.
    let mut found = None;
    for entry in fs::read_dir(&lib_dir).with_context(|| format!("reading {}", lib_dir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM.so.") {
            found = Some(name.into_owned());
        }
    }
    let Some(file_name) = found else {
        bail!("no libLLVM.so.* in {}", lib_dir.display());
    };
    let major = file_name
        .trim_start_matches("libLLVM.so.")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|s| s.parse::<u32>().ok())
        .with_context(|| format!("cannot read the LLVM version from {file_name}"))?;
    let target = lib_dir.join(&file_name);
    let prefix = cache_dir()?.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link_name in ["libLLVM.so", file_name.as_str()] {
        ensure_symlink(&prefix_lib.join(link_name), &target)?;
    }
    Ok((prefix, major))
}

fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if fs::symlink_metadata(link).is_ok() {
        fs::remove_file(link).with_context(|| format!("removing stale {}", link.display()))?;
    }
    symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

fn ensure_bpf_linker(llvm_prefix: &Path, llvm_major: u32) -> Result<()> {
    let root = cache_dir()?.join("bpf-linker");
    let bin = root.join("bin/bpf-linker");
    // Present and able to start (its libLLVM is found): nothing to do.
    if bin.exists()
        && Command::new(&bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!(
        "installing bpf-linker {BPF_LINKER_VERSION} into {} (about a minute)",
        root.display()
    );
    let root_arg = root.to_string_lossy().into_owned();
    let features = format!("llvm-{llvm_major}");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &features,
            "--root",
            &root_arg,
        ])
        .env("LLVM_PREFIX", llvm_prefix))
}
