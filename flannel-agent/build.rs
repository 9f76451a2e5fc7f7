//! Embeds the eBPF object (built by `cargo xtask build-ebpf`) when it exists.
//!
//! Sets `cfg(flannel_ebpf_embedded)` and `FLANNEL_EBPF_OBJECT` (its absolute path) so
//! `aya::include_bytes_aligned!(env!("FLANNEL_EBPF_OBJECT"))` works; without the object the
//! agent still builds and reports the eBPF data plane as unavailable.

use std::path::{Path, PathBuf};

const OBJECT_IN_TARGET: &str = "bpfel-unknown-none/release/flannel-ebpf";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(flannel_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    println!("cargo::rerun-if-changed=build.rs");

    let target_dir = target_dir();
    let object = target_dir.join(OBJECT_IN_TARGET);
    // Watch the object once it exists. Before that, watch its directory: a missing file would
    // make cargo rerun this script on every build, and the directory's other files change on
    // every eBPF build, so it is only watched until the object appears.
    if object.is_file() {
        println!("cargo::rerun-if-changed={}", object.display());
    } else if let Some(dir) = object.parent() {
        if std::fs::create_dir_all(dir).is_ok() {
            println!("cargo::rerun-if-changed={}", dir.display());
        }
    }
    if object.is_file() {
        println!("cargo::rustc-cfg=flannel_ebpf_embedded");
        println!("cargo::rustc-env=FLANNEL_EBPF_OBJECT={}", object.display());
    } else {
        println!(
            "cargo::warning=eBPF object {} not found: building without the eBPF data plane (run `cargo xtask build-ebpf` first to embed it)",
            object.display()
        );
    }
}

/// The workspace's target directory: `CARGO_TARGET_DIR` if set, else the target directory that
/// holds this build's OUT_DIR, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let workspace = manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.clone());
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_relative() {
            workspace.join(dir)
        } else {
            dir
        };
    }
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out; the triple level
    // exists when cargo was given --target.
    if let Some(out_dir) = std::env::var_os("OUT_DIR") {
        let out_dir = PathBuf::from(out_dir);
        if let Some(above_profile) = out_dir.ancestors().nth(4) {
            let triple = std::env::var_os("TARGET").unwrap_or_default();
            let dir = if above_profile.file_name() == Some(triple.as_os_str()) {
                above_profile.parent()
            } else {
                Some(above_profile)
            };
            if let Some(dir) = dir {
                return dir.to_path_buf();
            }
        }
    }
    workspace.join("target")
}
