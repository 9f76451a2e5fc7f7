//! `cargo xtask build-ebpf`: compiles `flannel-ebpf` for `bpfel-unknown-none`.
//!
//! The object lands in `<target dir>/bpfel-unknown-none/<profile>/flannel-ebpf`; the agent's
//! build script embeds the release one when it exists. The BPF rustflags (`--btf` and friends)
//! come from the workspace's one `.cargo/config.toml`.

use anyhow::{bail, Context, Result};

use crate::{setup_ebpf, workspace};

pub fn run(release: bool) -> Result<()> {
    setup_ebpf::ensure_toolchain()?;
    let linker_dir = setup_ebpf::bpf_linker_bin_dir()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![linker_dir];
    dirs.extend(std::env::split_paths(&path));
    let path = std::env::join_paths(dirs).context("building PATH")?;

    let mut cmd = workspace::cargo();
    cmd.args([
        "+nightly",
        "build",
        "--package",
        "flannel-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .env("PATH", path)
    // RUSTFLAGS would replace the target rustflags of .cargo/config.toml (and drop --btf);
    // the toolchain and compiler of the cargo that runs xtask are not ours to use.
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("CARGO_BUILD_TARGET");
    if release {
        cmd.arg("--release");
    }
    workspace::run(&mut cmd).context("building the eBPF object")?;

    let target_dir = workspace::target_dir();
    let profile = if release { "release" } else { "debug" };
    let object = target_dir
        .join("bpfel-unknown-none")
        .join(profile)
        .join("flannel-ebpf");
    if !object.is_file() {
        bail!("build succeeded but {} is missing", object.display());
    }
    println!("eBPF object: {}", object.display());
    Ok(())
}
