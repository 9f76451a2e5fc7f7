//! One overlay: a cluster on an underlay, the network config in etcd, a flanneld on every host
//! (or subnet.env written by hand for hand-made data paths), and containers attached by the real
//! CNI plugins, any number per host. The tests, the demo and the bench all start from here.
//!
//! ```no_run
//! # use flannel_tests::Overlay;
//! let o = Overlay::builder(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#, 3)
//!     .containers_per_host(2)
//!     .start()
//!     .unwrap();
//! assert!(o.containers[0].ping(o.containers[5].ip, 3, 2).unwrap());
//! ```
//!
//! Agents run with `--ip-masq` unless told otherwise, as a Kubernetes deployment of flannel
//! does: then flanneld masquerades traffic leaving the overlay and the bridge plugin does not
//! (`ipMasq: !FLANNEL_IPMASQ`), so pod-to-pod traffic keeps its addresses.
//!
//! Drop order: CNI DEL of every container, the agents, their bpffs pins, then the namespaces.

use std::time::Duration;

use anyhow::Context;

use crate::agent::Agent;
use crate::cluster::{Cluster, Underlay};
use crate::cni::SubnetEnv;
use crate::container::Container;
use crate::traffic::tcp_send;
use crate::{wait_for, Result};

/// How long an agent may take to report ready.
pub const READY: Duration = Duration::from_secs(20);
/// How long agents may take to learn each other once ready.
const PEERS: Duration = Duration::from_secs(5);

type Hook = Box<dyn FnOnce(&Cluster) -> Result<()>>;

pub struct Overlay {
    /// Every container, in attach order; `Container::host` says where each runs.
    pub containers: Vec<Container>,
    /// One per host (empty for hand-made paths).
    pub agents: Vec<Agent>,
    pub cluster: Cluster,
    /// The flags each host's agent runs with.
    flags: Vec<Vec<String>>,
}

enum Plane {
    /// flanneld on every host with this network config.
    Agents { config: String },
    /// No agents: each host gets this subnet.env; the data path is the caller's.
    HandMade(Vec<SubnetEnv>),
}

pub struct OverlayBuilder {
    plane: Plane,
    hosts: usize,
    underlay: Option<Underlay>,
    flags: Vec<Vec<String>>,
    ip_masq: bool,
    containers_per_host: usize,
    wait_peers: bool,
    before_agents: Vec<Hook>,
}

impl Overlay {
    /// `hosts` hosts running flanneld with network config `config`, one container each.
    pub fn builder(config: &str, hosts: usize) -> OverlayBuilder {
        OverlayBuilder::new(
            Plane::Agents {
                config: config.to_owned(),
            },
            hosts,
        )
    }

    /// One host per `envs` entry, no agent: the subnet.env is written as given and containers
    /// are attached from it. The caller builds the data path (in `before_agents`).
    pub fn hand_made(envs: Vec<SubnetEnv>) -> OverlayBuilder {
        let hosts = envs.len();
        OverlayBuilder::new(Plane::HandMade(envs), hosts)
    }

    /// Host `host`'s subnet.env (the agent's, or the hand-written one).
    pub fn subnet_env(&self, host: usize) -> Result<SubnetEnv> {
        let h = self.cluster.hosts.get(host).context("no such host")?;
        SubnetEnv::read(&h.dir.join("subnet.env"))
    }

    /// Attach one more container to `host`; returns its index in `containers`.
    pub fn attach(&mut self, host: usize) -> Result<usize> {
        let env = self.subnet_env(host)?;
        let h = &self.cluster.hosts[host];
        self.containers.push(Container::attach(h, &env)?);
        Ok(self.containers.len() - 1)
    }

    /// The containers on `host`.
    pub fn on_host(&self, host: usize) -> impl Iterator<Item = &Container> {
        self.containers.iter().filter(move |c| c.host == host)
    }

    /// The first container on `host`.
    pub fn container(&self, host: usize) -> &Container {
        self.on_host(host)
            .next()
            .unwrap_or_else(|| panic!("no container on host {host}"))
    }

    /// Start host `i`'s agent again with its flags (stopping it first if it still runs) and
    /// wait until it is ready.
    pub fn start_agent(&mut self, i: usize) -> Result<&mut Agent> {
        self.agents[i].stop()?;
        let flags: Vec<&str> = self.flags[i].iter().map(String::as_str).collect();
        let mut agent = self.cluster.start_agent(i, &flags)?;
        agent.wait_ready(READY)?;
        self.agents[i] = agent;
        Ok(&mut self.agents[i])
    }

    /// Stop host `i`'s agent and run `flanneld uninstall` there with its subnet file and pin
    /// dir, as an operator would.
    pub fn uninstall(&mut self, i: usize) -> Result<std::process::Output> {
        self.agents[i].stop()?;
        let host = &self.cluster.hosts[i];
        host.flanneld(&[
            "uninstall",
            &format!("--subnet-file={}", self.agents[i].subnet_file.display()),
            &format!("--bpf-pin-dir={}", host.pin_dir()),
        ])
    }

    /// The log of host `host`'s agent (for failure messages).
    pub fn agent_log(&self, host: usize) -> String {
        self.agents.get(host).map(Agent::log).unwrap_or_default()
    }

    /// Between every ordered pair of containers: pings (after a first one got through) and a
    /// verified TCP transfer of `bytes`. Where the sender's host masquerades in flanneld (not in
    /// the bridge plugin), the receiver must see the sender's own address: no NAT in the overlay.
    pub fn check_all_pairs(&self, bytes: usize) -> Result<()> {
        for a in &self.containers {
            let no_nat = self.subnet_env(a.host)?.ipmasq;
            for b in &self.containers {
                if a.ip == b.ip {
                    continue;
                }
                let logs = || {
                    format!(
                        "--- host {} agent ---\n{}\n--- host {} agent ---\n{}",
                        a.host,
                        self.agent_log(a.host),
                        b.host,
                        self.agent_log(b.host)
                    )
                };
                let pair = format!("{} (host {}) -> {} (host {})", a.ip, a.host, b.ip, b.host);
                wait_for(Duration::from_secs(5), "a first ping", || {
                    a.ping(b.ip, 1, 1).ok()?.then_some(())
                })
                .with_context(|| format!("ping {pair}\n{}", logs()))?;
                anyhow::ensure!(a.ping(b.ip, 3, 2)?, "ping {pair}: lost pings\n{}", logs());
                let t = tcp_send(&a.ns, &b.ns, b.ip, bytes)
                    .with_context(|| format!("TCP {pair}\n{}", logs()))?;
                anyhow::ensure!(
                    !no_nat || t.client == std::net::IpAddr::V4(a.ip),
                    "TCP {pair}: the receiver saw {}: NAT inside the overlay",
                    t.client
                );
            }
        }
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // CNI DEL while the host namespaces are still there.
        self.containers.clear();
        self.agents.clear();
        // Agents leave their pins behind on purpose (the next agent adopts them); ours go.
        for h in &self.cluster.hosts {
            let _ = std::fs::remove_dir_all(h.pin_dir());
        }
    }
}

impl OverlayBuilder {
    fn new(plane: Plane, hosts: usize) -> Self {
        OverlayBuilder {
            plane,
            hosts,
            underlay: None,
            flags: vec![Vec::new(); hosts],
            ip_masq: true,
            containers_per_host: 1,
            wait_peers: true,
            before_agents: Vec::new(),
        }
    }

    /// The underlay; default `$FLANNEL_TEST_UNDERLAY`, else veth.
    pub fn underlay(mut self, u: Underlay) -> Self {
        self.underlay = Some(u);
        self
    }

    /// Extra flanneld flags for every host.
    pub fn flags(mut self, flags: &[&str]) -> Self {
        for f in &mut self.flags {
            f.extend(flags.iter().map(|s| s.to_string()));
        }
        self
    }

    /// Extra flanneld flags for host `i`.
    pub fn host_flags(mut self, i: usize, flags: &[&str]) -> Self {
        self.flags[i].extend(flags.iter().map(|s| s.to_string()));
        self
    }

    /// Without `--ip-masq` the bridge plugin masquerades, pod-to-pod traffic leaving the host
    /// included (upstream behaves the same).
    pub fn ip_masq(mut self, on: bool) -> Self {
        self.ip_masq = on;
        self
    }

    pub fn containers_per_host(mut self, n: usize) -> Self {
        self.containers_per_host = n;
        self
    }

    /// Do not wait for every agent to know every other (tests with peers of their own).
    pub fn no_peer_wait(mut self) -> Self {
        self.wait_peers = false;
        self
    }

    /// Run `f` once the cluster and the network config (or subnet.env) are there, before any
    /// agent starts and any container is attached.
    pub fn before_agents(mut self, f: impl FnOnce(&Cluster) -> Result<()> + 'static) -> Self {
        self.before_agents.push(Box::new(f));
        self
    }

    pub fn start(self) -> Result<Overlay> {
        let underlay = match self.underlay {
            Some(u) => u,
            None => Underlay::from_env()?,
        };
        let cluster = Cluster::with_underlay(self.hosts, underlay)?;
        let mut flags = self.flags;
        for f in &mut flags {
            if self.ip_masq && !f.iter().any(|f| f.starts_with("--ip-masq")) {
                f.push("--ip-masq".to_owned());
            }
        }
        let mut o = Overlay {
            containers: Vec::new(),
            agents: Vec::new(),
            cluster,
            flags,
        };
        match &self.plane {
            Plane::Agents { config } => o.cluster.set_config(config)?,
            Plane::HandMade(envs) => {
                for (h, env) in o.cluster.hosts.iter().zip(envs) {
                    std::fs::write(h.dir.join("subnet.env"), env.render())?;
                }
            }
        }
        for f in self.before_agents {
            f(&o.cluster)?;
        }
        if let Plane::Agents { .. } = self.plane {
            for i in 0..self.hosts {
                let flags: Vec<&str> = o.flags[i].iter().map(String::as_str).collect();
                let agent = o.cluster.start_agent(i, &flags)?;
                o.agents.push(agent);
            }
            for a in &mut o.agents {
                a.wait_ready(READY)?;
            }
            if self.wait_peers {
                let others = self.hosts - 1;
                for a in &o.agents {
                    wait_for(PEERS, "every agent to know every other", || {
                        (a.peers().ok()?.len() == others).then_some(())
                    })
                    .with_context(|| format!("agent {}:\n{}", a.ip, a.log()))?;
                }
            }
        }
        for host in 0..self.hosts {
            for _ in 0..self.containers_per_host {
                o.attach(host)
                    .with_context(|| format!("attaching a container to host {host}"))?;
            }
        }
        Ok(o)
    }
}
