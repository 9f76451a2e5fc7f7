//! The agent's start-up steps before its tasks run, each with the error line an operator
//! sees: etcd, the external interface, the network config and its backend, our lease's
//! attributes, the host set-up for our lease (subnet.env, firewall rules, blackhole route).

use std::time::Duration;

use std::net::Ipv4Addr;

use anyhow::Context;
use ipnetwork::Ipv4Network;
use rtnetlink::Handle;
use tokio::sync::watch;

use crate::backend::{AnyBackend, AnyNetwork, Backend, BackendOptions};
use crate::cli::Flags;
use crate::config::NetworkConfig;
use crate::iface::{lookup_external_interface, ExternalInterface, IfaceSelector};
use crate::lease::{Lease, LeaseAttrs};
use crate::status::AgentStatus;
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

/// The interface flags select (first, as upstream: the backend is built for it), and the
/// rtnetlink handle later steps use.
pub async fn external_interface(flags: &Flags) -> anyhow::Result<(Handle, ExternalInterface)> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let selector = IfaceSelector {
        ifaces: flags.iface.clone(),
        regexes: flags.iface_regex.clone(),
        can_reach: flags.iface_can_reach,
        public_ip: flags.public_ip,
        public_ipv6: flags.public_ipv6,
    };
    let ext = lookup_external_interface(&handle, &selector)
        .await
        .context("finding the external interface")?;
    let v6 = |a: Option<std::net::Ipv6Addr>| a.map_or("none".to_owned(), |a| a.to_string());
    log::info!(
        "using interface {} (index {}, mtu {}), address {}, public address {}, IPv6 address {}, public IPv6 address {}",
        ext.name,
        ext.index,
        ext.mtu,
        ext.iface_addr,
        ext.ext_addr,
        v6(ext.iface_v6_addr),
        v6(ext.ext_v6_addr)
    );
    Ok((handle, ext))
}

/// What goes into our lease: the backend's attributes for our public IP (0.0.0.0 in an
/// IPv6-only network, as upstream), with EnableIPv6 our public IPv6 address (`--public-ipv6`,
/// else the interface's global one). Fails when the interface lacks a family the config needs.
pub fn lease_attrs(
    config: &NetworkConfig,
    backend: &AnyBackend,
    ext: &ExternalInterface,
) -> anyhow::Result<LeaseAttrs> {
    ext.check_stack(config.enable_ipv4, config.enable_ipv6)
        .context("the external interface")?;
    let public_ip = match config.enable_ipv4 {
        true => ext.ext_addr,
        false => Ipv4Addr::UNSPECIFIED,
    };
    let mut attrs = backend.lease_attrs(public_ip);
    if config.enable_ipv6 {
        attrs.public_ipv6 = ext.ext_v6_addr;
        backend.add_ipv6_attrs(&mut attrs);
    }
    Ok(attrs)
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
        udp_decap: flags.udp_decap,
        udp_attach: flags.udp_attach,
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

/// iptables mode only (as upstream; nftables mode has no such check): whether pod-to-pod
/// traffic on the bridge passes through iptables, warned about once and recorded for
/// `/metrics`. Always checked in iptables mode rather than only when a bridge exists: flannel's
/// CNI plugin always puts pods behind the `bridge` plugin's cni0, which usually appears only
/// with the first pod, after flanneld started.
pub fn check_br_netfilter(config: &NetworkConfig, status: &AgentStatus) {
    if config.enable_nftables {
        return;
    }
    let checks = crate::br_netfilter::check(config.enable_ipv4, config.enable_ipv6);
    if let Some(line) = crate::br_netfilter::warning(&checks) {
        log::warn!("{line}");
    }
    status.set_bridge_netfilter(checks);
}

/// What `set_up_host` leaves running: the backend's network for our lease, and the sender
/// the firewall rules and blackhole route follow our subnet through.
pub struct HostSetUp {
    pub network: AnyNetwork,
    pub subnet_tx: watch::Sender<Ipv4Network>,
}

/// Starts the backend for `own`, writes subnet.env and installs (and keeps) the firewall rules
/// and the blackhole route. They follow our subnet through the returned sender when a lost
/// lease comes back as another.
pub async fn set_up_host(
    flags: &Flags,
    config: &NetworkConfig,
    own: &Lease,
    backend: AnyBackend,
    previous: &PreviousSubnetEnv,
    handle: &Handle,
) -> anyhow::Result<HostSetUp> {
    let (name, mtu) = (backend.name(), backend.mtu());
    let network = backend
        .start(own, config)
        .await
        .with_context(|| format!("starting the {name} backend"))?;
    let env = SubnetEnv {
        ipv4: config.enable_ipv4.then_some((config.network, own.subnet())),
        mtu,
        ip_masq: flags.ip_masq,
        ipv6: config.ipv6_network.zip(own.key.ipv6),
    };
    env.write(&flags.subnet_file)
        .with_context(|| format!("writing {}", flags.subnet_file.display()))?;
    let (subnet_tx, subnet_rx) = watch::channel(own.subnet());
    let rule_opts = crate::iptables::RuleOptions {
        ip_masq: flags.ip_masq,
        forward: flags.iptables_forward_rules,
        random_fully_disable: flags.ip_masq_fully_random_disable,
        resync: Duration::from_secs(flags.iptables_resync),
    };
    if config.enable_nftables {
        crate::nftables::install_and_keep(
            rule_opts,
            config.enable_ipv4.then_some(config.network),
            subnet_rx.clone(),
            config.ipv6_network.zip(own.key.ipv6),
        )
        .await
        .context("installing nftables rules")?;
    } else {
        if config.enable_ipv4 {
            crate::iptables::install_and_keep(
                rule_opts,
                config.network,
                subnet_rx.clone(),
                previous,
            )
            .await
            .context("installing iptables rules")?;
        }
        if let (Some(network6), Some(subnet6)) = (config.ipv6_network, own.key.ipv6) {
            crate::iptables::install_and_keep_v6(rule_opts, network6, subnet6)
                .await
                .context("installing ip6tables rules")?;
        }
    }
    // IPv4 only, as upstream: no blackhole route for an IPv6-only network.
    if flags.ip_blackhole_route && config.enable_ipv4 {
        tokio::spawn(crate::blackhole::keep(
            handle.clone(),
            subnet_rx,
            rule_opts.resync,
        ));
    }
    Ok(HostSetUp { network, subnet_tx })
}
