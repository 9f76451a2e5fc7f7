//! Inside a kernel-matrix VM, before any test: what a Debian kernel booted by virtme-ng lacks
//! compared with this machine's kernel (where all of it is built in and set up). There is no
//! udev and nothing loads modules at boot, bpffs is not mounted.
//!
//! And speed: the guest's root is this machine's, shared over 9p without a page cache, so every
//! `ip`, `nsenter` or `iptables` the tests run reads its binary and libraries through qemu again
//! (measured under TCG on 6.1: `ip link show` 0.4-0.6 s from the shared root, 0.13 s from RAM;
//! a static busybox 0.27 s against 0.02 s). The tools the tests run are therefore copied into
//! the guest's RAM and bound over their own paths first (ebpf_programs: 117 s -> 55 s for six
//! tests); the host lists them (`ram_files`), where `ldd` is quick.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};

/// Modules the tests need, loaded up front (the kernel loads some on demand, but not all:
/// `/dev/net/tun` exists only once `tun` is loaded, and `br_netfilter` changes what the bridge
/// does without anyone asking for it). modprobe pulls in dependencies such as `udp_tunnel` and
/// `ip6_udp_tunnel` (vxlan).
const MODULES: &[(&str, &str)] = &[
    ("veth", "the underlay and pod links"),
    (
        "bridge",
        "cni0 (CNI bridge plugin), the harness's underlay switch",
    ),
    (
        "br_netfilter",
        "bridged traffic through iptables, as on this machine",
    ),
    (
        "vxlan",
        "flannel0 of the eBPF data plane (kernel VXLAN receive)",
    ),
    ("tun", "/dev/net/tun: flannel0 of the TUN data plane"),
    (
        "sch_ingress",
        "clsact qdisc: TC programs where there is no TCX",
    ),
    ("cls_bpf", "TC BPF classifiers (netlink attach)"),
    ("nf_conntrack", "--ip-masq and the CNI plugin's masquerade"),
    ("nf_nat", "MASQUERADE"),
    (
        "nf_tables",
        "iptables here is iptables-nft; nft for --nftables",
    ),
    ("nft_compat", "iptables-nft's xt matches and targets"),
    ("nft_chain_nat", "nat chains"),
    ("nft_masq", "nft masquerade"),
    ("xt_MASQUERADE", "iptables -j MASQUERADE"),
    ("xt_comment", "iptables -m comment (every flanneld rule)"),
    ("xt_mark", "iptables -m mark (kube-proxy's mark)"),
    ("xt_conntrack", "iptables -m conntrack (CNI bridge plugin)"),
    ("xt_addrtype", "iptables -m addrtype"),
];

/// Root-namespace sysctls as this machine has them (the namespaces the tests create start from
/// the kernel's defaults either way).
const SYSCTLS: &[(&str, &str)] = &[
    ("net.core.bpf_jit_enable", "1"),
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
];

/// What the tests and the agent execute, over and over (each through nsenter).
const TOOLS: &[&str] = &[
    "ip",
    "bridge",
    "nsenter",
    "sysctl",
    "iptables",
    "ip6tables",
    "iptables-save",
    "ip6tables-save",
    "iptables-restore",
    "ip6tables-restore",
    "nft",
    "bpftool",
    "ethtool",
    "ping",
    "tcpdump",
    "etcd",
    "etcdctl",
    "sh",
    "modprobe",
];

/// The CNI plugins the harness's pods use.
const CNI_PLUGINS: &[&str] = &[
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/lib/cni/portmap",
];

/// iptables-nft loads its matches and targets from here on every run.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// Host side: the files to keep in the guest's RAM, resolved (symlinks followed): the tools,
/// the CNI plugins, `flanneld`, their libraries (by `ldd`), iptables' extensions, ld.so's cache.
pub fn ram_files(flanneld: &Path) -> Result<Vec<PathBuf>> {
    let mut programs: Vec<PathBuf> = Vec::new();
    for tool in TOOLS {
        programs.push(
            which(tool).with_context(|| format!("{tool} is not on PATH (cargo xtask setup)"))?,
        );
    }
    programs.extend(CNI_PLUGINS.iter().map(PathBuf::from));
    programs.push(flanneld.to_path_buf());
    let mut files = BTreeSet::new();
    for p in &programs {
        let out = Command::new("ldd").arg(p).output().context("running ldd")?;
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2
        // (0x...)`; static programs have none.
        for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if word.starts_with('/') {
                files.insert(resolve(Path::new(word))?);
            }
        }
        files.insert(resolve(p)?);
    }
    for e in std::fs::read_dir(XTABLES_DIR).with_context(|| format!("reading {XTABLES_DIR}"))? {
        files.insert(resolve(&e?.path())?);
    }
    files.insert(resolve(Path::new("/etc/ld.so.cache"))?);
    Ok(files.into_iter().collect())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn resolve(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()))
}

/// Guest side: copies each file into the guest's RAM (its own /run) and binds the copy over
/// the file, so every later open or exec of that path reads RAM.
fn keep_in_ram(files: &[PathBuf]) -> Result<()> {
    let dir = Path::new("/run/fl-ram");
    std::fs::create_dir_all(dir).context("creating /run/fl-ram")?;
    for (i, file) in files.iter().enumerate() {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned());
        let copy = dir.join(format!("{i}-{}", name.unwrap_or_default()));
        std::fs::copy(file, &copy).with_context(|| format!("copying {}", file.display()))?;
        mount(
            Some(&copy),
            file,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("binding a copy in RAM over {}", file.display()))?;
    }
    Ok(())
}

/// Keeps `ram_files` in RAM, loads the modules, mounts bpffs, sets the sysctls. Fails on the
/// first that does not work, naming it. Returns how long each step took.
pub fn prepare(ram_files: &[PathBuf]) -> Result<Vec<(&'static str, Duration)>> {
    let mut steps = Vec::new();
    let mut t = Instant::now();
    let mut done = |step: &'static str, t: &mut Instant| {
        steps.push((step, t.elapsed()));
        *t = Instant::now();
    };
    // First: modprobe itself then runs from RAM.
    keep_in_ram(ram_files).context("guest setup: keeping the tools in RAM")?;
    done("tools into RAM", &mut t);
    load_modules()?;
    done("modules", &mut t);
    if !mounted("/sys/fs/bpf") {
        mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .context("guest setup: mounting bpffs on /sys/fs/bpf")?;
    }
    for (key, value) in SYSCTLS {
        let file = Path::new("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&file, value)
            .with_context(|| format!("guest setup: sysctl {key}={value}"))?;
    }
    done("bpffs, sysctls", &mut t);
    Ok(steps)
}

/// All modules with one modprobe (each exec is slow under TCG); if that fails, one by one to
/// name the module that does not load.
fn load_modules() -> Result<()> {
    let all = Command::new("modprobe")
        .arg("-a")
        .args(MODULES.iter().map(|(m, _)| m))
        .output()
        .context("guest setup: running modprobe")?;
    if !all.status.success() {
        for (module, why) in MODULES {
            let out = Command::new("modprobe")
                .arg(module)
                .output()
                .context("guest setup: running modprobe")?;
            if !out.status.success() {
                bail!(
                    "guest setup: modprobe {module} ({why}) failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        bail!(
            "guest setup: modprobe -a failed: {}",
            String::from_utf8_lossy(&all.stderr).trim()
        );
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("guest setup: /dev/net/tun is missing after modprobe tun");
    }
    Ok(())
}

fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}
