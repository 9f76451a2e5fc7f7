//! Machine setup, idempotent: Debian packages, a mounted bpffs, the eBPF toolchain.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{run, setup_ebpf};

/// Debian packages the build, the tests and the demo use.
const PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "iproute2",
    "iptables",
    "bpftool",
    "iperf3",
    "tcpdump",
    "ethtool",
    "protobuf-compiler", // etcd-client's build script compiles etcd's protos
    "libprotobuf-dev",   // ... which import google/protobuf/descriptor.proto
    "containernetworking-plugins", // bridge, host-local: how flannel's CNI plugin attaches pods
    "procps",            // sysctl
    "util-linux",        // nsenter
    "iputils-ping",
    "openssl", // certificates for the etcd TLS tests
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn ensure() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("setup needs root (apt-get, bpffs, network namespaces)");
    }
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing))?;
    }
    // A package install may start etcd as a service; our tests run their own in namespaces.
    let bpffs_mounted = std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
        })
        .unwrap_or(false);
    if !bpffs_mounted {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    setup_ebpf::ensure_toolchain()
}
