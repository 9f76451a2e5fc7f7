//! The agent's start-up steps before its tasks run, each with the error line an operator
//! sees: etcd, the external interface, the network config and its backend, the host set-up
//! for our lease (subnet.env, iptables).

use std::time::Duration;

use anyhow::Context;

use crate::backend::{AnyBackend, Backend, BackendOptions};
use crate::cli::Flags;
use crate::config::NetworkConfig;
use crate::iface::{lookup_external_interface, ExternalInterface, IfaceSelector};
use crate::lease::Lease;
use crate::subnet::config_wait::wait_for_config;
use crate::subnet::registry::{explain_with, EtcdSettings};
use crate::subnet::EtcdRegistry;
use crate::subnet_env::{PreviousSubnetEnv, SubnetEnv};

/// etcd, waited for while unreachable; a mistake in the flags or files is the error.
pub async fn connect_etcd(flags: &Flags) -> anyhow::Result<EtcdRegistry> {
    let settings = EtcdSettings::from_flags(flags);
    EtcdRegistry::connect_when_up(&settings)
        .await
        .map_err(|e| anyhow::anyhow!(explain_with(&e, &settings.target())))
}

/// The interface flags select (first, as upstream: the backend is built for it).
pub async fn external_interface(flags: &Flags) -> anyhow::Result<ExternalInterface> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let selector = IfaceSelector {
        ifaces: flags.iface.clone(),
        regexes: flags.iface_regex.clone(),
        can_reach: flags.iface_can_reach,
        public_ip: flags.public_ip,
    };
    let ext = lookup_external_interface(&handle, &selector)
        .await
        .context("finding the external interface")?;
    log::info!(
        "using interface {} (index {}, mtu {}), address {}, public address {}",
        ext.name,
        ext.index,
        ext.mtu,
        ext.iface_addr,
        ext.ext_addr
    );
    Ok(ext)
}

/// The network config and the backend it names, built for `ext`: a config naming an unknown
/// backend or bad options is waited out like an invalid one.
pub async fn network_config(
    registry: &EtcdRegistry,
    ext: &ExternalInterface,
    flags: &Flags,
) -> (NetworkConfig, AnyBackend) {
    let opts = BackendOptions {
        udp_dataplane: flags.udp_dataplane,
        bpf_pin_dir: flags.bpf_pin_dir.clone(),
    };
    let (config, backend) = wait_for_config(registry, |c| {
        AnyBackend::new(c, ext, &opts).map_err(|e| e.to_string())
    })
    .await;
    log::info!(
        "network {} subnets /{} from {} to {}, backend {}",
        config.network,
        config.subnet_len,
        config.subnet_min,
        config.subnet_max,
        config.backend.backend_type
    );
    (config, backend)
}

/// Starts the backend for `own`, writes subnet.env and installs (and keeps) the iptables rules.
pub async fn set_up_host(
    flags: &Flags,
    config: &NetworkConfig,
    own: &Lease,
    backend: &mut AnyBackend,
    previous: &PreviousSubnetEnv,
) -> anyhow::Result<()> {
    backend
        .start(own, config)
        .await
        .with_context(|| format!("starting the {} backend", backend.name()))?;
    let env = SubnetEnv {
        network: config.network,
        subnet: own.subnet(),
        mtu: backend.mtu(),
        ip_masq: flags.ip_masq,
    };
    env.write(&flags.subnet_file)
        .with_context(|| format!("writing {}", flags.subnet_file.display()))?;
    crate::iptables::install_and_keep(
        flags.ip_masq,
        flags.iptables_forward_rules,
        Duration::from_secs(flags.iptables_resync),
        config.network,
        own.subnet(),
        previous,
    )
    .await
    .context("installing iptables rules")
}
