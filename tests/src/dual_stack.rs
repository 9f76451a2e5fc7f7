//! Dual stack in the harness: an IPv6 underlay on the hosts and pods attached with an IPv4 and
//! an IPv6 range, as flannel's CNI plugin renders them for a dual-stack subnet.env, or with the
//! IPv6 range alone for an IPv6-only one.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::Context;

use crate::cni::{self, Attachment};
use crate::etcd::KeyValue;
use crate::traffic::tcp_send_ip;
use crate::{wait_for, Cluster, Host, Netns, Overlay, Result, SubnetEnv};

static PODS: AtomicU32 = AtomicU32::new(0);

/// IPv6 on the underlay: 2001:db8::<10+i>/64 on each host's eth0, and forwarding.
pub fn ipv6_underlay(c: &Cluster) -> Result<()> {
    for h in &c.hosts {
        h.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("2001:db8::{}/64", 10 + h.index),
            "dev",
            "eth0",
            "nodad",
        ])?;
        h.ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    Ok(())
}

/// An overlay of `n` hosts with the IPv6 underlay ([`ipv6_underlay`]) and no pods, agents
/// started on the network `config`.
pub fn on_ipv6_underlay(config: &str, n: usize) -> Result<Overlay> {
    Overlay::builder(config, n)
        .containers_per_host(0)
        .before_agents(ipv6_underlay)
        .start()
}

/// The dual-stack lease among `leases` of the node whose IPv4 subnet is `v4` (upstream's key
/// `<v4>&<v6>`, `-` for `/`), and the address of its IPv6 subnet, which must be a /64.
pub fn dual_stack_lease<'a>(leases: &'a [KeyValue], v4: &str) -> (&'a KeyValue, &'a str) {
    let lease = leases
        .iter()
        .find(|kv| kv.key.contains(&format!("/{}&", v4.replace('/', "-"))))
        .unwrap_or_else(|| {
            panic!(
                "no dual-stack key for {v4}: {:?}",
                leases.iter().map(|l| &l.key).collect::<Vec<_>>()
            )
        });
    let name = lease.key.rsplit('/').next().unwrap_or_default();
    let v6 = name
        .split_once('&')
        .map(|(_, v6)| v6)
        .unwrap_or_else(|| panic!("no IPv6 part in {name}"));
    let (v6_ip, v6_len) = v6
        .rsplit_once('-')
        .unwrap_or_else(|| panic!("no prefix length in {v6}"));
    assert_eq!(v6_len, "64", "{name}");
    (lease, v6_ip)
}

/// The IPv6 underlay subnet behind the router: 2001:db8:1::/64.
pub const ROUTED_V6_PREFIX: &str = "2001:db8:1::";

/// Host `i` also gets 2001:db8:1::<10+i>/64, which the other hosts reach only through the
/// switch acting as an IPv6 router (2001:db8::1): a host on another L2 network as far as they
/// can tell. Runs after [`ipv6_underlay`].
pub fn ipv6_behind_router(i: usize) -> impl FnOnce(&Cluster) -> Result<()> {
    move |c: &Cluster| {
        for a in ["2001:db8::1/64", &format!("{ROUTED_V6_PREFIX}1/64")] {
            c.switch
                .ip(&["-6", "addr", "add", a, "dev", "br0", "nodad"])?;
        }
        c.switch.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for h in &c.hosts {
            if h.index == i {
                h.ns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{ROUTED_V6_PREFIX}{}/64", 10 + i),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
            } else {
                h.ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("{ROUTED_V6_PREFIX}/64"),
                    "via",
                    "2001:db8::1",
                    "dev",
                    "eth0",
                ])?;
            }
        }
        Ok(())
    }
}

/// A dual-stack pod: its namespace, its CNI attachment (removed on drop) and its addresses.
pub struct DualPod {
    _attachment: Attachment,
    pub ns: Netns,
    pub v4: IpAddr,
    pub v6: IpAddr,
}

impl DualPod {
    /// Attach a pod on `host` with the delegate config flannel's CNI plugin renders for a
    /// dual-stack subnet.env: a second ipam range for our IPv6 subnet `v6_subnet` and a route
    /// to the IPv6 network `v6_network`.
    pub fn attach(host: &Host, env: &SubnetEnv, v6_subnet: &str, v6_network: &str) -> Result<Self> {
        let n = PODS.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::create(&format!("{}-d{n}", host.ns.name))?;
        let config = cni::bridge_config(
            env.mtu,
            env.ipmasq,
            &[env.subnet_network()?, v6_subnet.to_owned()],
            &[env.network.clone(), v6_network.to_owned()],
            &host.cni_data_dir(),
        );
        let attachment = Attachment::add(&host.ns.path(), &ns.path(), &ns.name, config)?;
        let ip = |i: usize| -> Result<IpAddr> {
            let a = attachment.result["ips"][i]["address"]
                .as_str()
                .with_context(|| format!("no address {i} in {}", attachment.result))?;
            Ok(a.split('/').next().unwrap_or(a).parse()?)
        };
        let (v4, v6) = (ip(0)?, ip(1)?);
        anyhow::ensure!(
            v4.is_ipv4() && v6.is_ipv6(),
            "not one IPv4 and one IPv6 address: {}",
            attachment.result
        );
        no_dad(&ns);
        Ok(DualPod {
            _attachment: attachment,
            ns,
            v4,
            v6,
        })
    }

    /// One pod on every host of `o`, in host order, in each agent's IPv4 and IPv6 subnet, routed
    /// to the IPv6 network `v6_network`.
    pub fn one_per_host(o: &Overlay, v6_network: &str) -> Result<Vec<Self>> {
        (0..o.cluster.hosts.len())
            .map(|i| {
                let v6_subnet = o.agents[i]
                    .ipv6_subnet()
                    .with_context(|| format!("no FLANNEL_IPV6_SUBNET on host {i}"))?;
                Self::attach(
                    &o.cluster.hosts[i],
                    &o.subnet_env(i)?,
                    &v6_subnet,
                    v6_network,
                )
            })
            .collect()
    }

    /// One ping to `to` answered within a second.
    pub fn ping(&self, to: IpAddr) -> bool {
        ping_once(&self.ns, to)
    }
}

/// No DAD wait before the first packets.
fn no_dad(ns: &Netns) {
    let _ = ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0");
}

fn ping_once(ns: &Netns, to: IpAddr) -> bool {
    ns.command("ping")
        .args(["-n", "-q", "-c", "1", "-W", "1", &to.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// What an IPv6-only subnet.env (EnableIPv4 false) gives the CNI rendering: no FLANNEL_NETWORK
/// or FLANNEL_SUBNET, the IPv6 lines, MTU and masquerading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V6SubnetEnv {
    /// FLANNEL_IPV6_NETWORK.
    pub network: String,
    /// FLANNEL_IPV6_SUBNET as a network, e.g. fd00:10:244:5::/64.
    pub subnet: String,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl V6SubnetEnv {
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let value = |key: &str| -> Result<&str> {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .with_context(|| format!("{} has no {key}", path.display()))
        };
        let first = value("FLANNEL_IPV6_SUBNET")?;
        let (ip, len) = first
            .split_once('/')
            .context("FLANNEL_IPV6_SUBNET length")?;
        let ip: std::net::Ipv6Addr = ip.parse().context("FLANNEL_IPV6_SUBNET address")?;
        let len: u32 = len.parse().context("FLANNEL_IPV6_SUBNET length")?;
        anyhow::ensure!(len <= 128, "FLANNEL_IPV6_SUBNET length {len} > 128");
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        Ok(V6SubnetEnv {
            network: value("FLANNEL_IPV6_NETWORK")?.to_owned(),
            subnet: format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(ip) & mask)),
            mtu: value("FLANNEL_MTU")?.parse().context("FLANNEL_MTU")?,
            ipmasq: value("FLANNEL_IPMASQ")?.parse().context("FLANNEL_IPMASQ")?,
        })
    }
}

/// A pod of an IPv6-only network: its namespace, its CNI attachment and its one address.
pub struct V6Pod {
    _attachment: Attachment,
    pub ns: Netns,
    pub v6: IpAddr,
}

impl V6Pod {
    /// Attach a pod on `host` as flannel's CNI plugin does for an IPv6-only subnet.env: one
    /// range (our IPv6 subnet), a route to the IPv6 network.
    pub fn attach(host: &Host, env: &V6SubnetEnv) -> Result<Self> {
        let n = PODS.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::create(&format!("{}-v{n}", host.ns.name))?;
        let config = cni::bridge_config(
            env.mtu,
            env.ipmasq,
            std::slice::from_ref(&env.subnet),
            std::slice::from_ref(&env.network),
            &host.cni_data_dir(),
        );
        let attachment = Attachment::add(&host.ns.path(), &ns.path(), &ns.name, config)?;
        let a = attachment.result["ips"][0]["address"]
            .as_str()
            .with_context(|| format!("no address in {}", attachment.result))?;
        let v6: IpAddr = a.split('/').next().unwrap_or(a).parse()?;
        anyhow::ensure!(v6.is_ipv6(), "not an IPv6 address: {}", attachment.result);
        no_dad(&ns);
        Ok(V6Pod {
            _attachment: attachment,
            ns,
            v6,
        })
    }

    /// One ping to `to` answered within a second.
    pub fn ping(&self, to: IpAddr) -> bool {
        ping_once(&self.ns, to)
    }
}

/// Between every ordered pair of `pods`, to its IPv4 and its IPv6 address: a first ping within
/// 10 s, then a verified TCP transfer of `bytes`; over IPv6 the receiver must see the sender's
/// own address (no NAT inside the overlay).
pub fn check_all_pairs(pods: &[DualPod], bytes: usize) -> Result<()> {
    for a in pods {
        for b in pods.iter().filter(|b| b.v4 != a.v4) {
            for dst in [b.v4, b.v6] {
                let pair = format!("{} -> {dst}", a.v4);
                wait_for(Duration::from_secs(10), "a first ping", || {
                    a.ping(dst).then_some(())
                })
                .with_context(|| format!("ping {pair}"))?;
                let t =
                    tcp_send_ip(&a.ns, &b.ns, dst, bytes).with_context(|| format!("TCP {pair}"))?;
                anyhow::ensure!(t.bytes == bytes, "TCP {pair}: {} bytes", t.bytes);
                anyhow::ensure!(
                    dst.is_ipv4() || t.client == a.v6,
                    "TCP {pair}: the receiver saw {}, not the sender's own {}",
                    t.client,
                    a.v6
                );
            }
        }
    }
    Ok(())
}
