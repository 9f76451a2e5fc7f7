//! Pods attached the way a flannel deployment attaches them: the real CNI plugins
//! (`containernetworking-plugins`: `bridge`, `host-local`, `loopback` in [`PLUGIN_DIR`]) run with
//! the delegate config that flannel's own CNI plugin renders from subnet.env.
//!
//! [`delegate_config`] is that rendering, the one place this harness defines it. For a host whose
//! subnet.env says
//!
//! ```text
//! FLANNEL_NETWORK=10.244.0.0/16
//! FLANNEL_SUBNET=10.244.5.1/24
//! FLANNEL_MTU=1472
//! FLANNEL_IPMASQ=true
//! ```
//!
//! it is (a CNI config file a user can copy as it is, dataDir aside):
//!
//! ```json
//! {"cniVersion":"0.3.1","name":"cbr0","type":"bridge","ipMasq":false,"mtu":1472,
//!  "isGateway":true,"hairpinMode":true,"isDefaultGateway":true,
//!  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.5.0/24"}]],
//!          "routes":[{"dst":"10.244.0.0/16"}],"dataDir":"<host dir>/cni"}}
//! ```
//!
//! - `ipMasq` is the opposite of FLANNEL_IPMASQ: when flanneld does not masquerade, the bridge
//!   plugin does (and then also NATs pod-to-pod traffic leaving the host, as upstream does).
//! - The bridge is the plugin's default, `cni0`; it gets the subnet's first address (gateway).
//! - `dataDir` is the one addition: host-local keeps its allocations in
//!   `/var/lib/cni/networks/<name>` by default, shared by every test and host on the machine.
//!   Each host here has its own directory under the test's temp dir instead.
//!
//! The plugins run inside the host's namespace (`nsenter --net=...`, not `ip netns exec`, which
//! remounts /sys) with `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME=eth0` and
//! `CNI_PATH` set, the config on stdin, as a container runtime runs them.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde_json::json;

use crate::Result;

/// Where Debian's containernetworking-plugins installs the plugins (`CNI_PATH`).
pub const PLUGIN_DIR: &str = "/usr/lib/cni";
/// The network name flannel's CNI plugin passes on (kube-flannel's `cbr0`).
pub const NETWORK_NAME: &str = "cbr0";
/// The bridge plugin's default bridge, which flannel's delegate config leaves in place.
pub const BRIDGE: &str = "cni0";
/// The interface name inside the container.
pub const IFNAME: &str = "eth0";

/// The values of a subnet.env that the CNI rendering uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_NETWORK, e.g. 10.244.0.0/16.
    pub network: String,
    /// FLANNEL_SUBNET as written: the subnet's first address with its length, 10.244.5.1/24.
    pub subnet: String,
    pub mtu: u32,
    pub ipmasq: bool,
}

impl SubnetEnv {
    pub fn parse(text: &str) -> Result<Self> {
        let value = |key: &str| -> Result<&str> {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::trim)
                .with_context(|| format!("subnet.env has no {key}"))
        };
        Ok(SubnetEnv {
            network: value("FLANNEL_NETWORK")?.to_owned(),
            subnet: value("FLANNEL_SUBNET")?.to_owned(),
            mtu: value("FLANNEL_MTU")?.parse().context("FLANNEL_MTU")?,
            ipmasq: value("FLANNEL_IPMASQ")?.parse().context("FLANNEL_IPMASQ")?,
        })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The file as flanneld writes it (for hosts set up by hand, without an agent).
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network, self.subnet, self.mtu, self.ipmasq
        )
    }

    /// FLANNEL_SUBNET as a network address, 10.244.5.0/24 (what flannel's plugin hands
    /// host-local: Go's ParseCIDR result).
    pub fn subnet_network(&self) -> Result<String> {
        let (ip, len) = self
            .subnet
            .split_once('/')
            .with_context(|| format!("FLANNEL_SUBNET {} has no length", self.subnet))?;
        let ip: Ipv4Addr = ip.parse().context("FLANNEL_SUBNET address")?;
        let len: u32 = len.parse().context("FLANNEL_SUBNET length")?;
        if len > 32 {
            bail!("FLANNEL_SUBNET length {len} > 32");
        }
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        Ok(format!("{}/{len}", Ipv4Addr::from(u32::from(ip) & mask)))
    }
}

/// The delegate config flannel's CNI plugin passes to `bridge` for `env`, with host-local's
/// state in `data_dir` (see the module docs).
pub fn delegate_config(env: &SubnetEnv, data_dir: &Path) -> Result<serde_json::Value> {
    Ok(bridge_config(
        env.mtu,
        env.ipmasq,
        &[env.subnet_network()?],
        std::slice::from_ref(&env.network),
        data_dir,
    ))
}

/// The same rendering for any ranges (one per subnet, in order) and routes (to each network):
/// what flannel's plugin makes of a dual-stack or IPv6-only subnet.env.
pub fn bridge_config(
    mtu: u32,
    ipmasq: bool,
    subnets: &[String],
    networks: &[String],
    data_dir: &Path,
) -> serde_json::Value {
    let ranges: Vec<_> = subnets.iter().map(|s| json!([{ "subnet": s }])).collect();
    let routes: Vec<_> = networks.iter().map(|n| json!({ "dst": n })).collect();
    json!({
        "cniVersion": "0.3.1",
        "name": NETWORK_NAME,
        "type": "bridge",
        "ipMasq": !ipmasq,
        "mtu": mtu,
        "isGateway": true,
        "hairpinMode": true,
        "isDefaultGateway": true,
        "ipam": {
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
            "dataDir": data_dir,
        },
    })
}

/// What a runtime passes for `lo`.
fn loopback_config() -> serde_json::Value {
    json!({"cniVersion": "0.3.1", "name": "lo", "type": "loopback"})
}

/// One container attached by the plugins; CNI DEL on [`Attachment::detach`] or drop.
#[derive(Debug)]
pub struct Attachment {
    host_ns: PathBuf,
    netns: PathBuf,
    container_id: String,
    config: serde_json::Value,
    /// The IPv4 address host-local gave the container (0.0.0.0 for an IPv6-only pod: its
    /// addresses are in `result`).
    pub ip: Ipv4Addr,
    /// The plugin's ADD result, as it printed it.
    pub result: serde_json::Value,
    attached: bool,
}

impl Attachment {
    /// CNI ADD of `netns` (a namespace path) with `config`, from within namespace `host_ns`.
    pub fn add(
        host_ns: &Path,
        netns: &Path,
        container_id: &str,
        config: serde_json::Value,
    ) -> Result<Self> {
        run_plugin(
            "ADD",
            host_ns,
            netns,
            container_id,
            "lo",
            &loopback_config(),
        )?;
        let result = run_plugin("ADD", host_ns, netns, container_id, IFNAME, &config)?;
        let mut a = Attachment {
            host_ns: host_ns.to_owned(),
            netns: netns.to_owned(),
            container_id: container_id.to_owned(),
            config,
            ip: Ipv4Addr::UNSPECIFIED,
            result,
            attached: true,
        };
        // On a bad result, the drop still runs DEL.
        let mut addresses = Vec::new();
        for ip in a.result["ips"].as_array().into_iter().flatten() {
            let address = ip["address"]
                .as_str()
                .with_context(|| format!("CNI ADD result with a bad address: {}", a.result))?;
            let ip: std::net::IpAddr = address
                .split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .with_context(|| format!("CNI ADD address {address}"))?;
            addresses.push(ip);
        }
        anyhow::ensure!(
            !addresses.is_empty(),
            "CNI ADD result without an address: {}",
            a.result
        );
        if let Some(std::net::IpAddr::V4(v4)) = addresses.iter().find(|ip| ip.is_ipv4()) {
            a.ip = *v4;
        }
        Ok(a)
    }

    /// The config the plugin ran with.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// CNI DEL, reporting the plugin's error.
    pub fn detach(&mut self) -> Result<()> {
        if !std::mem::replace(&mut self.attached, false) {
            return Ok(());
        }
        run_plugin(
            "DEL",
            &self.host_ns,
            &self.netns,
            &self.container_id,
            IFNAME,
            &self.config,
        )?;
        run_plugin(
            "DEL",
            &self.host_ns,
            &self.netns,
            &self.container_id,
            "lo",
            &loopback_config(),
        )?;
        Ok(())
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

/// Run the plugin named by `config["type"]` as a runtime would; its stdout as JSON.
fn run_plugin(
    command: &str,
    host_ns: &Path,
    netns: &Path,
    container_id: &str,
    ifname: &str,
    config: &serde_json::Value,
) -> Result<serde_json::Value> {
    let kind = config["type"].as_str().context("CNI config without type")?;
    let plugin = Path::new(PLUGIN_DIR).join(kind);
    if !plugin.exists() {
        bail!(
            "{} missing: run `cargo xtask setup` (installs containernetworking-plugins)",
            plugin.display()
        );
    }
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", host_ns.display()))
        .arg(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", PLUGIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "CNI {command} {kind} ({ifname} of {container_id}) failed ({}): {stdout}{}\nconfig: {config}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if stdout.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("CNI {command} {kind} printed {stdout}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_flannels_delegate_config_from_subnet_env() {
        let env = SubnetEnv::parse(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.58.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n",
        )
        .unwrap();
        let c = delegate_config(&env, Path::new("/tmp/x")).unwrap();
        assert_eq!(
            c,
            json!({"cniVersion":"0.3.1","name":"cbr0","type":"bridge","ipMasq":true,"mtu":1472,
                "isGateway":true,"hairpinMode":true,"isDefaultGateway":true,
                "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.58.0/24"}]],
                        "routes":[{"dst":"10.244.0.0/16"}],"dataDir":"/tmp/x"}})
        );
        assert_eq!(SubnetEnv::parse(&env.render()).unwrap(), env);
        assert!(SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\n").is_err());
    }
}
