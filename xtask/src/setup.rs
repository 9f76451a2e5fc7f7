//! Machine setup, idempotent: Debian packages, a mounted bpffs, the eBPF toolchain, and what
//! the kernel legs of the tests need (virtme-ng, the default Debian kernel).

use std::process::Command;

use anyhow::{bail, Result};

use crate::workspace::run;
use crate::{kernels, matrix, setup_ebpf, vm};

/// Debian packages the build, the tests and the demo use.
const PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "iproute2",
    "iptables",
    "nftables", // nft: the EnableNFTables traffic rules
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
    // The kernel legs of the tests (a Debian kernel booted by virtme-ng):
    "qemu-system-x86", // the VM (TCG: there is no KVM here)
    "kmod",            // depmod: the guest's modprobe finds the kernel's modules
    "busybox-static",  // virtme-ng builds its initramfs from busybox
    "python3-venv",    // virtme-ng's own virtualenv
];

/// Packages of the base system that `--from-scratch` leaves in place (apt, ssh and the
/// machine itself use them).
const KEEP_ON_PURGE: &[&str] = &["iproute2", "procps", "util-linux", "openssl"];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Each piece the build, tests, demo and bench need, proved by using it once; the first that
/// fails names itself and the package that provides it.
fn verify() -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("flannel-setup-check-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let proto = scratch.join("check.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\nmessage Check { google.protobuf.FieldDescriptorProto f = 1; }\n",
    )?;
    let proto_arg = format!(
        "--descriptor_set_out={}",
        scratch.join("check.pb").display()
    );
    let include = format!("-I{}", scratch.display());
    let checks: Vec<(&str, &str, Vec<&str>, &str)> = vec![
        (
            "protoc compiling a proto that imports descriptor.proto",
            "protoc",
            vec![&include, &proto_arg, "check.proto"],
            "protobuf-compiler and libprotobuf-dev",
        ),
        ("etcd", "etcd", vec!["--version"], "etcd-server"),
        ("etcdctl", "etcdctl", vec!["version"], "etcd-client"),
        ("bpftool", "bpftool", vec!["version"], "bpftool"),
        ("iperf3", "iperf3", vec!["--version"], "iperf3"),
        ("tcpdump", "tcpdump", vec!["--version"], "tcpdump"),
        ("ethtool", "ethtool", vec!["--version"], "ethtool"),
        ("iptables", "iptables", vec!["--version"], "iptables"),
        ("nft", "nft", vec!["--version"], "nftables"),
        ("openssl", "openssl", vec!["version"], "openssl"),
        ("nsenter", "nsenter", vec!["--version"], "util-linux"),
        (
            "qemu",
            "qemu-system-x86_64",
            vec!["--version"],
            "qemu-system-x86",
        ),
        ("depmod", "depmod", vec!["-V"], "kmod"),
        ("busybox", "busybox", vec!["true"], "busybox-static"),
        (
            "CNI bridge plugin",
            "/usr/lib/cni/bridge",
            vec!["--version"],
            "containernetworking-plugins",
        ),
        (
            "CNI host-local plugin",
            "/usr/lib/cni/host-local",
            vec!["--version"],
            "containernetworking-plugins",
        ),
    ];
    let mut result = Ok(());
    for (what, program, args, package) in checks {
        let ok = Command::new(program)
            .args(&args)
            .current_dir(&scratch)
            .stdin(std::process::Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            result = Err(anyhow::anyhow!(
                "setup check failed: {what} (`{program} {}`) does not work; install the Debian package {package}",
                args.join(" ")
            ));
            break;
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    if !bpffs_mounted() {
        bail!(
            "setup check failed: /sys/fs/bpf is not a mounted bpffs (mount -t bpf bpf /sys/fs/bpf)"
        );
    }
    let linker = setup_ebpf::bpf_linker_bin_dir()?.join("bpf-linker");
    let runs = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        bail!(
            "setup check failed: {} does not run; remove it and run `cargo xtask setup` again",
            linker.display()
        );
    }
    eprintln!("setup: every tool checked (protoc + descriptor.proto, etcd, etcdctl, bpftool, iperf3, tcpdump, ethtool, iptables, nft, openssl, nsenter, qemu, depmod, busybox, CNI plugins, bpffs, bpf-linker, virtme-ng, Debian kernel {})", matrix::DEFAULT_KERNEL);
    Ok(())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
        })
        .unwrap_or(false)
}

/// What a fresh machine lacks: purge the packages setup installs (and libprotobuf-dev, which a
/// machine may happen to have), and the cached toolchain pieces, so the next setup starts
/// from nothing. Returns what was removed.
pub fn purge() -> Result<Vec<String>> {
    if !nix::unistd::geteuid().is_root() {
        bail!("setup --from-scratch needs root (apt-get purge)");
    }
    let mut removed: Vec<String> = PACKAGES
        .iter()
        .copied()
        // The machine needs these for itself: purging them would break the check, not test it.
        .filter(|p| !KEEP_ON_PURGE.contains(p))
        .filter(|p| installed(p))
        .map(str::to_owned)
        .collect();
    if !removed.is_empty() {
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["purge", "-y", "-qq"])
            .args(&removed))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["autoremove", "--purge", "-y", "-qq"]))?;
    }
    let cache = setup_ebpf::cache_dir()?;
    if cache.exists() {
        std::fs::remove_dir_all(&cache)?;
        removed.push(format!(
            "{} (bpf-linker, LLVM links, virtme-ng, kernels)",
            cache.display()
        ));
    }
    Ok(removed)
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
    if !bpffs_mounted() {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    setup_ebpf::ensure_toolchain()?;
    vm::ensure_virtme_ng()?;
    if let Some(series) = kernels::series(matrix::DEFAULT_KERNEL) {
        kernels::ensure(series)?;
    }
    verify()
}
