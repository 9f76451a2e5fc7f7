//! A container on a host: its own namespace attached by the real CNI plugins with the
//! delegate config flannel's CNI plugin renders from the host's subnet.env (see `cni`), so it
//! hangs off the host's `cni0` bridge like a pod. CNI DEL runs before the namespace goes.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cluster::Host;
use crate::cni::{self, Attachment, SubnetEnv};
use crate::netns::Netns;
use crate::Result;

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Container {
    /// Dropped first: CNI DEL needs the namespace.
    pub attachment: Attachment,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// Index of the host it runs on.
    pub host: usize,
}

impl Container {
    /// Attach a new container to `host` with the CNI config rendered from `env` (the host's
    /// subnet.env).
    pub fn attach(host: &Host, env: &SubnetEnv) -> Result<Self> {
        Container::attach_with(host, cni::delegate_config(env, &host.cni_data_dir())?)
    }

    /// Attach to a second flannel network on `host`: the same delegate config with its own
    /// CNI network name, bridge and host-local state (as a second flannel CNI config would).
    pub fn attach_to_network(
        host: &Host,
        env: &SubnetEnv,
        network: &str,
        bridge: &str,
    ) -> Result<Self> {
        let mut config = cni::delegate_config(env, &host.cni_data_dir().join(network))?;
        config["name"] = network.into();
        config["bridge"] = bridge.into();
        Container::attach_with(host, config)
    }

    /// A new container namespace on `host`, attached with the delegate `config`.
    fn attach_with(host: &Host, config: serde_json::Value) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let ns = Netns::create(&format!("{}-c{n}", host.ns.name))?;
        let attachment = Attachment::add(&host.ns.path(), &ns.path(), &ns.name, config)?;
        Ok(Container {
            ip: attachment.ip,
            attachment,
            ns,
            host: host.index,
        })
    }

    /// CNI DEL now (instead of on drop), reporting the plugin's errors.
    pub fn detach(&mut self) -> Result<()> {
        self.attachment.detach()
    }

    /// `ping -n -q -c count -i 0.01 <extra> dst` from inside the container.
    pub fn ping_command(&self, dst: Ipv4Addr, count: u32, extra: &[&str]) -> std::process::Command {
        let mut c = self.ns.command("ping");
        c.args(["-n", "-q", "-c", &count.to_string(), "-i", "0.01"])
            .args(extra)
            .arg(dst.to_string());
        c
    }

    /// `ping -c count` to `dst`; Ok(true) when every reply came back.
    pub fn ping(&self, dst: Ipv4Addr, count: u32, timeout_s: u32) -> Result<bool> {
        let out = self
            .ping_command(dst, count, &["-W", &timeout_s.to_string()])
            .output()?;
        Ok(out.status.success())
    }
}
