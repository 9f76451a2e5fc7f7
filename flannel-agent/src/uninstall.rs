//! `flanneld uninstall`: removes what the agent leaves in place when it exits, so a host can
//! be returned to how it was: the pinned eBPF data plane, the overlay devices, upstream's
//! iptables chains and subnet.env. Run it after stopping flanneld; traffic over the overlay
//! stops.

use std::path::PathBuf;

use anyhow::Context;
use flannel_agent::backend::udp::ebpf::{EbpfDataplane, DEFAULT_PIN_DIR};
use flannel_agent::iptables::{self, Position, Rule};
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
}

/// Removes everything, step by step; a failing step does not stop the others.
pub async fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    let mut failures = Vec::new();
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
    if let Err(e) = remove_iptables_chains().await {
        failures.push(format!("iptables: {e:#}"));
    }
    match std::fs::remove_file(&args.subnet_file) {
        Ok(()) => log::info!("{} removed", args.subnet_file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => failures.push(format!("{}: {e}", args.subnet_file.display())),
    }
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("uninstall incomplete: {}", failures.join("; "))
    }
}

/// The devices flanneld creates: `flannel0` (udp) and `flannel.<VNI>` (vxlan).
fn is_flannel_device(name: &str) -> bool {
    name == "flannel0"
        || name
            .strip_prefix("flannel.")
            .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
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

async fn run_iptables(args: &[&str]) -> anyhow::Result<bool> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .await?;
    Ok(out.status.success())
}

/// Upstream's jumps into our chains, then the chains themselves. The jump rules do not depend
/// on the network, so any network gives the same ones.
async fn remove_iptables_chains() -> anyhow::Result<()> {
    let any_net = ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::new(10, 244, 0, 0), 16)?;
    let jumps: Vec<Rule> = iptables::forward_rules(any_net)
        .into_iter()
        .chain(iptables::masq_rules(any_net, any_net, false))
        .filter(|r| r.position == Position::Insert)
        .collect();
    match Command::new("iptables").arg("--version").output().await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::info!("no iptables command: no iptables rules to remove");
            return Ok(());
        }
        Err(e) => return Err(e).context("running iptables"),
        Ok(_) => {}
    }
    for jump in &jumps {
        let target = jump.spec.last().map(String::as_str).unwrap_or_default();
        let mut delete = vec!["-t", jump.table, "-D", jump.chain];
        delete.extend(jump.spec.iter().map(String::as_str));
        // It may have been added more than once.
        for _ in 0..64 {
            if !run_iptables(&delete).await? {
                break;
            }
        }
        if run_iptables(&["-t", jump.table, "-S", target]).await? {
            if !run_iptables(&["-t", jump.table, "-F", target]).await?
                || !run_iptables(&["-t", jump.table, "-X", target]).await?
            {
                anyhow::bail!(
                    "could not remove chain {target} (table {}): is something else jumping to it?",
                    jump.table
                );
            }
            log::info!("iptables chain {target} (table {}) removed", jump.table);
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
        assert!(!is_flannel_device("flannel."));
        assert!(!is_flannel_device("flannel.x"));
        assert!(!is_flannel_device("flannel1"));
        assert!(!is_flannel_device("eth0"));
        assert!(!is_flannel_device("cni0"));
    }
}
