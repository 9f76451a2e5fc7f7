//! `flanneld uninstall`: removes what the agent leaves in place when it exits, so a host can
//! be returned to how it was: the pinned eBPF data plane, the overlay devices, upstream's
//! iptables chains, host-gw routes and subnet.env. Run it after stopping flanneld (it refuses
//! while an agent holds the subnet file's lock, unless forced); traffic over the overlay stops.
//!
//! With classic TC (`--udp-attach`), exactly flannel's cls_bpf filters go (our pref, handle and
//! program names; other tools' filters stay). A clsact qdisc stays too, even one flannel added:
//! the kernel cannot delete it only if empty, so deleting it could take a filter another tool
//! added meanwhile. An empty clsact costs next to nothing (`tc qdisc del dev eth0 clsact`
//! removes it when nothing else uses it). flannel0's goes with the device.

use std::path::PathBuf;

use anyhow::Context;
use flannel_agent::backend::route;
use flannel_agent::backend::udp::ebpf::{EbpfDataplane, DEFAULT_PIN_DIR};
use flannel_agent::instance_lock::{self, InstanceLock, LockError};
use flannel_agent::iptables::{self, Position, Rule};
use flannel_agent::subnet_env::PreviousSubnetEnv;
use tokio::process::Command;

#[derive(Debug, clap::Parser)]
#[command(
    name = "flanneld uninstall",
    bin_name = "flanneld uninstall",
    about = "Remove the eBPF data plane, flannel devices, iptables chains and subnet.env"
)]
pub struct UninstallArgs {
    /// bpffs directory where the eBPF maps, programs and links are pinned
    #[arg(long, env = "FLANNELD_BPF_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
    /// subnet.env written by flanneld
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Remove everything even though a flanneld still runs with this --subnet-file
    #[arg(long)]
    pub force: bool,
}

/// Removes everything, step by step; a failing step does not stop the others.
pub async fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    match InstanceLock::check_free(&args.subnet_file) {
        Ok(()) => {}
        Err(LockError::Held { pid, .. }) if !args.force => anyhow::bail!(
            "flanneld{} is still running with --subnet-file {}: stop it first (e.g. systemctl stop flanneld), or pass --force",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            args.subnet_file.display()
        ),
        Err(e @ LockError::Held { .. }) => log::warn!("--force: {e}"),
        Err(e) => log::warn!("cannot tell whether flanneld runs: {e}"),
    }
    let mut failures = Vec::new();
    // What the agent wrote tells which routes are flannel's (read before removing the file).
    let previous = PreviousSubnetEnv::read(&args.subnet_file);
    // Programs first: once detached, nothing redirects into the devices we delete next.
    let pinned = args.bpf_pin_dir.exists();
    match EbpfDataplane::unload(&args.bpf_pin_dir) {
        Ok(()) if pinned => {
            log::info!("eBPF data plane in {} removed", args.bpf_pin_dir.display())
        }
        Ok(()) => {}
        Err(e) => failures.push(format!("eBPF pins in {}: {e}", args.bpf_pin_dir.display())),
    }
    if let Err(e) = remove_devices().await {
        failures.push(format!("devices: {e:#}"));
    }
    if let Some(network) = previous.network {
        if let Err(e) = remove_peer_routes(network, previous.subnet).await {
            failures.push(format!("routes: {e:#}"));
        }
    }
    for bin in [iptables::IPTABLES, iptables::IP6TABLES] {
        if let Err(e) = remove_iptables_chains(bin).await {
            failures.push(format!("{bin}: {e:#}"));
        }
    }
    match flannel_agent::nftables::remove_tables().await {
        Ok(removed) => {
            for t in removed {
                log::info!("nftables table {t} removed");
            }
        }
        // No nft: nothing of ours can be in nftables either.
        Err(flannel_agent::nftables::NftError::Spawn(_)) => {}
        Err(e) => failures.push(format!("nftables: {e}")),
    }
    for file in [
        args.subnet_file.clone(),
        instance_lock::lock_path(&args.subnet_file),
    ] {
        match std::fs::remove_file(&file) {
            Ok(()) => log::info!("{} removed", file.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("{}: {e}", file.display())),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("uninstall incomplete: {}", failures.join("; "))
    }
}

/// The devices flanneld creates: `flannel0` (udp), `flannel.<VNI>` and `flannel-v6.<VNI>`
/// (vxlan).
fn is_flannel_device(name: &str) -> bool {
    let is_vni = |vni: &str| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit());
    name == "flannel0"
        || name.strip_prefix("flannel.").is_some_and(is_vni)
        || name.strip_prefix("flannel-v6.").is_some_and(is_vni)
}

async fn remove_devices() -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let links = flannel_agent::iface::list_links(&handle)
        .await
        .context("listing devices")?;
    for link in links.iter().filter(|l| is_flannel_device(&l.name)) {
        handle
            .link()
            .del(link.index)
            .execute()
            .await
            .with_context(|| format!("deleting {}", link.name))?;
        log::info!("device {} removed", link.name);
    }
    Ok(())
}

/// host-gw (and vxlan DirectRouting) peer routes: gateway routes of the main table into the
/// Network other than our own subnet. vxlan's own routes went with its device.
async fn remove_peer_routes(
    network: ipnetwork::Ipv4Network,
    own: Option<ipnetwork::Ipv4Network>,
) -> anyhow::Result<()> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let routes = route::list_gateway_routes::<std::net::Ipv4Addr>(&handle)
        .await
        .context("listing routes")?;
    for r in routes
        .iter()
        .filter(|r| network.contains(r.dst.network()) && r.dst.prefix() >= network.prefix())
        .filter(|r| Some(r.dst) != own)
    {
        r.delete(&handle)
            .await
            .with_context(|| format!("deleting route {} via {}", r.dst, r.gateway))?;
        log::info!("route {} via {} removed", r.dst, r.gateway);
    }
    Ok(())
}

async fn run_iptables(bin: &str, args: &[&str]) -> anyhow::Result<bool> {
    let out = Command::new(bin).arg("-w").args(args).output().await?;
    Ok(out.status.success())
}

/// Upstream's jumps into our chains, then the chains themselves. The jump rules do not depend
/// on the network, so any network gives the same ones.
/// Same in `bin` (iptables, or ip6tables for a dual-stack node).
async fn remove_iptables_chains(bin: &str) -> anyhow::Result<()> {
    let any_net = ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::new(10, 244, 0, 0), 16)?;
    let jumps: Vec<Rule> = iptables::forward_rules(any_net)
        .into_iter()
        .chain(iptables::masq_rules(any_net, any_net, false))
        .filter(|r| r.position == Position::Insert)
        .collect();
    match Command::new(bin).arg("--version").output().await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::info!("no {bin} command: no {bin} rules to remove");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("running {bin}")),
        Ok(_) => {}
    }
    for jump in &jumps {
        let target = jump.spec.last().map(String::as_str).unwrap_or_default();
        let mut delete = vec!["-t", jump.table, "-D", jump.chain];
        delete.extend(jump.spec.iter().map(String::as_str));
        // It may have been added more than once.
        for _ in 0..64 {
            if !run_iptables(bin, &delete).await? {
                break;
            }
        }
        if run_iptables(bin, &["-t", jump.table, "-S", target]).await? {
            if !run_iptables(bin, &["-t", jump.table, "-F", target]).await?
                || !run_iptables(bin, &["-t", jump.table, "-X", target]).await?
            {
                anyhow::bail!(
                    "could not remove chain {target} (table {}): is something else jumping to it?",
                    jump.table
                );
            }
            log::info!("{bin} chain {target} (table {}) removed", jump.table);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flannel_devices_are_removed() {
        assert!(is_flannel_device("flannel0"));
        assert!(is_flannel_device("flannel.1"));
        assert!(is_flannel_device("flannel.4096"));
        assert!(is_flannel_device("flannel-v6.1"));
        assert!(!is_flannel_device("flannel-v6."));
        assert!(!is_flannel_device("flannel."));
        assert!(!is_flannel_device("flannel.x"));
        assert!(!is_flannel_device("flannel1"));
        assert!(!is_flannel_device("eth0"));
        assert!(!is_flannel_device("cni0"));
    }
}
