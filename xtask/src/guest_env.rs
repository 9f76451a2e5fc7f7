//! Inside a kernel-matrix VM, before any test: what a Debian kernel booted by virtme-ng lacks
//! compared with this machine's kernel (where all of it is built in and set up). There is no
//! udev and nothing loads modules at boot, bpffs is not mounted.

use std::process::Command;

use anyhow::{bail, Context, Result};

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

/// Loads the modules, mounts bpffs, sets the sysctls. Fails on the first that does not work,
/// naming it.
pub fn prepare() -> Result<()> {
    for (module, why) in MODULES {
        let out = Command::new("modprobe")
            .arg(module)
            .output()
            .context("running modprobe")?;
        if !out.status.success() {
            bail!(
                "guest setup: modprobe {module} ({why}) failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        bail!("guest setup: /dev/net/tun is missing after modprobe tun");
    }
    if !mounted("/sys/fs/bpf") {
        check(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
            .context("guest setup: mounting bpffs on /sys/fs/bpf")?;
    }
    for (key, value) in SYSCTLS {
        check(Command::new("sysctl").args(["-qw", &format!("{key}={value}")]))
            .with_context(|| format!("guest setup: sysctl {key}={value}"))?;
    }
    Ok(())
}

fn mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(path)))
        .unwrap_or(false)
}

fn check(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
