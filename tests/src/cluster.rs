//! A small cluster: a "switch" namespace with a bridge on the underlay 192.0.2.0/24 and etcd at
//! 192.0.2.1, and N host namespaces each joined to the bridge by a veth (`eth0`, 192.0.2.10+i),
//! in one of two [`Underlay`] modes.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::Context;

use crate::agent::Agent;
use crate::etcd::Etcd;
use crate::netns::{self, Netns};
use crate::{Result, TempDir};

pub const ETCD_IP: &str = "192.0.2.1";
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// How the underlay carries frames between hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underlay {
    /// Plain veths: GSO super-packets (64 KB) cross from host to host whole. The best case.
    Veth,
    /// Like a physical NIC and switch: the switch port towards each host segments to MTU-sized
    /// frames (`ethtool -K <port> tso off gso off tx-udp-segmentation off`) and the host's
    /// `eth0` aggregates them again with GRO (`ethtool -K eth0 gro on`). What real hosts see.
    Nic,
}

impl Underlay {
    pub const ALL: [Underlay; 2] = [Underlay::Veth, Underlay::Nic];

    pub fn name(self) -> &'static str {
        match self {
            Underlay::Veth => "veth",
            Underlay::Nic => "nic",
        }
    }

    /// `$FLANNEL_TEST_UNDERLAY` (`veth` or `nic`), else `veth`: runs any test on either.
    pub fn from_env() -> Result<Self> {
        match std::env::var("FLANNEL_TEST_UNDERLAY").as_deref() {
            Err(_) | Ok("") | Ok("veth") => Ok(Underlay::Veth),
            Ok("nic") => Ok(Underlay::Nic),
            Ok(other) => anyhow::bail!("FLANNEL_TEST_UNDERLAY={other}: expected veth or nic"),
        }
    }
}

pub struct Host {
    pub index: usize,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Per-host scratch dir (subnet.env, logs).
    pub dir: PathBuf,
}

impl Host {
    /// Adds a route to `dst` (IPv4 or IPv6) via `via` on eth0, one the agent did not make (a
    /// left-over of an earlier run, an operator's).
    pub fn add_route_via_eth0(&self, dst: &str, via: &str) -> Result<()> {
        let family = if dst.contains(':') { "-6" } else { "-4" };
        self.ns
            .ip(&[family, "route", "add", dst, "via", via, "dev", "eth0"])
            .map(|_| ())
    }

    /// host-local's state for containers on this host (never the machine-wide default).
    pub fn cni_data_dir(&self) -> PathBuf {
        self.dir.join("cni")
    }

    /// Runs `flanneld <args>` (an operator subcommand such as `uninstall` or `dataplane`) in
    /// this host's namespace, as an operator on the host would.
    pub fn flanneld(&self, args: &[&str]) -> Result<std::process::Output> {
        self.ns
            .command(&crate::flanneld_bin().to_string_lossy())
            .args(args)
            .output()
            .context("running flanneld")
    }

    /// Where this host's agent pins its eBPF state (the harness's --bpf-pin-dir).
    pub fn pin_dir(&self) -> String {
        format!("/sys/fs/bpf/{}", self.ns.name)
    }

    /// Subnet network addresses (e.g. "10.244.5.0") in the pinned peer map, via bpftool.
    pub fn pinned_peer_subnets(&self) -> Result<Vec<String>> {
        let pin = format!("{}/flannel_peers", self.pin_dir());
        let out = netns::run(
            std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned", &pin]),
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v.as_array()
            .context("bpftool map dump: not a JSON array")?
            .iter()
            .map(|e| {
                let octets = e["formatted"]["key"]["subnet"]
                    .as_array()
                    .context("key without BTF field names")?;
                Ok(octets
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("."))
            })
            .collect()
    }
}

pub struct Cluster {
    pub tag: String,
    pub underlay: Underlay,
    // Field order is drop order: hosts and etcd go before the switch and the temp dir.
    pub hosts: Vec<Host>,
    pub etcd: Etcd,
    pub switch: Netns,
    pub dir: TempDir,
}

impl Cluster {
    /// Bring up etcd and `n` hosts (n <= 200) on the underlay `$FLANNEL_TEST_UNDERLAY` names.
    pub fn new(n: usize) -> Result<Self> {
        Self::with_underlay(n, Underlay::from_env()?)
    }

    pub fn with_underlay(n: usize, underlay: Underlay) -> Result<Self> {
        crate::require_root();
        netns::remove_stale();
        let tag = netns::unique_tag();
        let dir = TempDir::new(&tag)?;
        let switch = Netns::create(&format!("{tag}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["addr", "add", &format!("{ETCD_IP}/24"), "dev", "br0"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let etcd = Etcd::start(&switch, ETCD_IP, dir.0.join("etcd"))?;
        let mut cluster = Cluster {
            tag,
            underlay,
            hosts: Vec::new(),
            etcd,
            switch,
            dir,
        };
        for _ in 0..n {
            cluster.add_host()?;
        }
        Ok(cluster)
    }

    pub fn add_host(&mut self) -> Result<&Host> {
        let index = self.hosts.len();
        let ip = Ipv4Addr::new(192, 0, 2, 10 + index as u8);
        let ns = Netns::create(&format!("{}-h{index}", self.tag))?;
        self.wire_host(&ns, index, ip)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let dir = self.dir.0.join(format!("h{index}"));
        std::fs::create_dir_all(&dir)?;
        self.hosts.push(Host { index, ns, ip, dir });
        self.hosts.last().context("host just added")
    }

    /// Host `index`'s `eth0` deleted and made again, same name and address, on the same
    /// switch port (a NIC driver reload, a veth replaced): a new ifindex.
    pub fn replug_host(&self, index: usize) -> Result<()> {
        let host = self.hosts.get(index).context("no such host")?;
        host.ns.ip(&["link", "del", "eth0"])?;
        self.wire_host(&host.ns, index, host.ip)
    }

    /// `eth0` of host `index` on the switch, with the underlay's offloads and the default route.
    fn wire_host(&self, ns: &Netns, index: usize, ip: Ipv4Addr) -> Result<()> {
        let port = format!("h{index}");
        self.plug(ns, &port, ip)?;
        // A veth hands a UDP GSO train to its peer in one piece; a real wire (or NIC) never
        // does. Segment UDP GSO on transmit, as a NIC without UDP segmentation offload would.
        ns.exec("ethtool", &["-K", "eth0", "tx-udp-segmentation", "off"])?;
        if self.underlay == Underlay::Nic {
            self.switch.exec(
                "ethtool",
                &[
                    "-K",
                    &port,
                    "tso",
                    "off",
                    "gso",
                    "off",
                    "tx-udp-segmentation",
                    "off",
                ],
            )?;
            ns.exec("ethtool", &["-K", "eth0", "gro", "on"])?;
        }
        ns.ip(&["route", "add", "default", "via", ETCD_IP])?;
        Ok(())
    }

    /// A machine on the underlay outside the overlay (no agent), at `ip`/24 on the switch:
    /// what a pod reaching beyond the cluster talks to. Named `<tag>-<name>`.
    pub fn add_outside(&self, name: &str, ip: Ipv4Addr) -> Result<Netns> {
        let ns = Netns::create(&format!("{}-{name}", self.tag))?;
        self.plug(&ns, &format!("o{name}"), ip)?;
        Ok(ns)
    }

    /// Joins `ns` to the switch: a veth whose switch end `port` is on br0 and whose other end
    /// is `eth0` in `ns`, up, at `ip`/24.
    fn plug(&self, ns: &Netns, port: &str, ip: Ipv4Addr) -> Result<()> {
        // Create the pair in the switch namespace, then move one end into `ns`.
        self.switch
            .ip(&["link", "add", port, "type", "veth", "peer", "name", "eth0"])?;
        self.switch
            .ip(&["link", "set", "eth0", "netns", &ns.path().to_string_lossy()])?;
        self.switch
            .ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Write the network config.
    pub fn set_config(&self, json: &str) -> Result<()> {
        self.etcd.put(&format!("{DEFAULT_PREFIX}/config"), json)
    }

    /// Start flanneld on host `i` with the harness defaults plus `extra` flags.
    pub fn start_agent(&self, i: usize, extra: &[&str]) -> Result<Agent> {
        Agent::start(&self.hosts[i], &self.etcd.endpoint(), extra)
    }

    /// Subnet keys in etcd: (subnet key suffix, value, lease id).
    pub fn leases(&self) -> Result<Vec<crate::etcd::KeyValue>> {
        self.etcd.list(&format!("{DEFAULT_PREFIX}/subnets/"))
    }
}
