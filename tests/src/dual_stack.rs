//! Dual stack in the harness: an IPv6 underlay on the hosts and pods attached with an IPv4 and
//! an IPv6 range, as flannel's CNI plugin renders them for a dual-stack subnet.env.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use serde_json::json;

use crate::cni::{self, Attachment};
use crate::{Cluster, Host, Netns, Result, SubnetEnv};

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
        let mut config = cni::delegate_config(env, &host.cni_data_dir())?;
        config["ipam"]["ranges"] =
            json!([[{"subnet": env.subnet_network()?}], [{"subnet": v6_subnet}]]);
        config["ipam"]["routes"] = json!([{"dst": env.network}, {"dst": v6_network}]);
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
        // No DAD wait before the first packets.
        let _ = ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0");
        Ok(DualPod {
            _attachment: attachment,
            ns,
            v4,
            v6,
        })
    }

    /// One ping to `to` answered within a second.
    pub fn ping(&self, to: IpAddr) -> bool {
        self.ns
            .command("ping")
            .args(["-n", "-q", "-c", "1", "-W", "1", &to.to_string()])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}
