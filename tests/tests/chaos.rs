//! Chaos: 5 agents (udp backend, a container each) on a 3-member etcd cluster with auth on.
//! Random faults for a bounded time (FLANNEL_CHAOS_SECS, default 120): kill -9 and restart of
//! agents and members, a member cut off from its peers, an agent's etcd lease revoked, a peer
//! lease deleted and re-added, a restart of the whole etcd cluster (every token lost).
//! Checked all along: no agent exits, no two live nodes hold the same subnet (subnet.env and
//! etcd). After each fault, once quiet (etcd healthy, every watch up): each node's peer map
//! equals etcd's content and pings between the containers work, both within 2 s.
//! Seeded (FLANNEL_CHAOS_SEED, else the clock); a failure prints the seed and every fault.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flannel_tests::cni::SubnetEnv;
use flannel_tests::etcd::peer_view;
use flannel_tests::etcd_cluster::{EtcdCluster, FLANNEL_PASSWORD, FLANNEL_USER};
use flannel_tests::rng::{seed_from_env, Rng};
use flannel_tests::{Agent, Cluster, Container, Result};
use nix::sys::signal::Signal;

const NODES: usize = 5;
const MEMBERS: usize = 3;
const PREFIX: &str = "/coreos.com/network";
const SUBNETS: &str = "/coreos.com/network/subnets/";
const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const FAKE_KEY: &str = "/coreos.com/network/subnets/10.244.250.0-24";
const FAKE_VALUE: &str = r#"{"PublicIP":"192.0.2.99","PublicIPv6":null}"#;
/// After quiet, the peer maps and pings must be right within this.
const RECOVERY: Duration = Duration::from_secs(2);
/// How long the cluster may take to become quiet after a fault is healed.
const QUIET_WITHIN: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillAgent(usize),
    KillMember(usize),
    IsolateMember(usize),
    RevokeLease(usize),
    DeleteReaddPeerLease,
    RestartEtcd,
}

struct Chaos {
    // Drop order: containers and agents before etcd, etcd before the cluster's namespaces.
    containers: Vec<Container>,
    agents: Vec<Agent>,
    etcd: EtcdCluster,
    cluster: Cluster,
    log: String,
    start: Instant,
    longest: Duration,
    faults: usize,
    /// Agents we killed and have not restarted yet.
    down: Vec<bool>,
}

impl Chaos {
    fn note(&mut self, what: &str) {
        let line = format!("[{:>6.1}s] {what}", self.start.elapsed().as_secs_f64());
        eprintln!("chaos {line}");
        let _ = writeln!(self.log, "{line}");
    }

    fn start_agent(&self, i: usize) -> Result<Agent> {
        Agent::start(
            &self.cluster.hosts[i],
            &self.etcd.endpoints(),
            &[
                &format!("--etcd-username={FLANNEL_USER}"),
                &format!("--etcd-password={FLANNEL_PASSWORD}"),
            ],
        )
    }

    /// What etcd says node `i`'s peers are.
    fn etcd_view(&self, own_ip: &str) -> Result<Vec<(String, String)>> {
        Ok(peer_view(self.etcd.list(SUBNETS)?, SUBNETS, own_ip))
    }

    /// Checked all the time: no agent exited, no two nodes hold the same subnet.
    fn check_invariants(&mut self) -> Result<()> {
        let mut subnets = BTreeSet::new();
        for (i, a) in self.agents.iter_mut().enumerate() {
            if self.down[i] {
                continue;
            }
            if let Some(st) = a.try_wait()? {
                bail!("agent {i} exited ({st}):\n{}", a.log());
            }
            if let Some(s) = a.subnet() {
                if !subnets.insert(s.clone()) {
                    bail!("two nodes hold {s} in subnet.env");
                }
            }
        }
        // etcd may be down in the middle of a fault: then there is nothing to compare.
        if let Ok(kvs) = self.etcd.list(SUBNETS) {
            for (i, a) in self.agents.iter().enumerate() {
                if self.down[i] {
                    continue;
                }
                let Some(s) = a.subnet() else { continue };
                let key = format!("{SUBNETS}{}", s.replace('/', "-"));
                if let Some(value) = kvs.iter().find(|kv| kv.key == key).map(|kv| &kv.value) {
                    let ip = a.ip.to_string();
                    if !value.contains(&format!("\"{ip}\"")) {
                        bail!("node {ip} uses {s} but etcd leases it to someone else: {value}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Sleep `d`, checking the invariants meanwhile.
    fn hold(&mut self, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.check_invariants()?;
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn watch_up(a: &Agent) -> bool {
        let Ok((200, body)) = a.http_get("/metrics") else {
            return false;
        };
        body.lines()
            .any(|l| l == "flannel_watch_state{state=\"up\"} 1")
            && matches!(a.http_get("/readyz"), Ok((200, _)))
    }

    /// Wait for quiet (etcd healthy, every agent's watch up), then for the peer maps and pings
    /// to be right. Returns the time from `healed` to full recovery.
    fn recover(&mut self, healed: Instant) -> Result<Duration> {
        self.etcd.wait_healthy()?;
        let deadline = Instant::now() + QUIET_WITHIN;
        loop {
            self.check_invariants()?;
            if self.agents.iter().all(Self::watch_up) {
                break;
            }
            if Instant::now() > deadline {
                let states: Vec<String> = self
                    .agents
                    .iter()
                    .map(|a| format!("{}: {:?}", a.ip, a.http_get("/readyz")))
                    .collect();
                bail!("not quiet {QUIET_WITHIN:?} after the fault: {states:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let quiet = Instant::now();
        for i in 0..NODES {
            loop {
                let a = &self.agents[i];
                let want = self.etcd_view(&a.ip.to_string())?;
                let got = a.peers()?;
                if got == want {
                    break;
                }
                if quiet.elapsed() > RECOVERY {
                    bail!(
                        "node {}: peers {got:?} != etcd {want:?} {:?} after quiet",
                        a.ip,
                        quiet.elapsed()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for i in 0..NODES {
            let dst = self.containers[(i + 1) % NODES].ip;
            while !self.containers[i].ping(dst, 1, 1)? {
                if quiet.elapsed() > RECOVERY {
                    bail!(
                        "ping {} -> {dst} fails {:?} after quiet",
                        self.containers[i].ip,
                        quiet.elapsed()
                    );
                }
            }
        }
        let quiet_to_ok = quiet.elapsed();
        let total = healed.elapsed();
        self.note(&format!(
            "recovered: {total:?} after healing ({quiet_to_ok:?} after quiet)"
        ));
        self.longest = self.longest.max(total);
        Ok(total)
    }

    fn pick(&mut self, rng: &mut Rng) -> Fault {
        match rng.below(6) {
            0 => Fault::KillAgent(rng.below(NODES)),
            1 => Fault::KillMember(rng.below(MEMBERS)),
            2 => Fault::IsolateMember(rng.below(MEMBERS)),
            3 => Fault::RevokeLease(rng.below(NODES)),
            4 => Fault::DeleteReaddPeerLease,
            _ => Fault::RestartEtcd,
        }
    }

    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Result<Instant> {
        self.faults += 1;
        let hold = rng.millis(500, 4000);
        self.note(&format!("fault {}: {fault:?}, held {hold:?}", self.faults));
        match fault {
            Fault::KillAgent(i) => {
                self.down[i] = true;
                self.agents[i].signal(Signal::SIGKILL)?;
                self.agents[i].wait_exit(Duration::from_secs(5))?;
                self.hold(hold)?;
                self.agents[i] = self.start_agent(i)?;
                self.down[i] = false;
                self.agents[i]
                    .wait_ready(Duration::from_secs(30))
                    .with_context(|| format!("agent {i} after its restart"))?;
            }
            Fault::KillMember(m) => {
                self.etcd.kill(m)?;
                self.hold(hold)?;
                self.etcd.resume(m)?;
            }
            Fault::IsolateMember(m) => {
                self.etcd.isolate(m)?;
                // Long enough, sometimes, for the member to notice it has no leader.
                self.hold(hold + Duration::from_secs(2))?;
                self.etcd.heal(m)?;
            }
            Fault::RevokeLease(i) => {
                let subnet = self.agents[i].subnet().context("subnet.env")?;
                let key = format!("{SUBNETS}{}", subnet.replace('/', "-"));
                let lease = self
                    .etcd
                    .list(&key)?
                    .first()
                    .map(|kv| kv.lease)
                    .context("agent's key missing")?;
                self.etcd.ctl(&["lease", "revoke", &format!("{lease:x}")])?;
                self.hold(hold)?;
            }
            Fault::DeleteReaddPeerLease => {
                self.etcd.del(FAKE_KEY)?;
                self.hold(hold)?;
                self.etcd.put(FAKE_KEY, FAKE_VALUE)?;
            }
            Fault::RestartEtcd => {
                for m in 0..MEMBERS {
                    self.etcd.stop(m)?;
                }
                self.hold(hold)?;
                for m in 0..MEMBERS {
                    self.etcd.resume(m)?;
                }
            }
        }
        Ok(Instant::now())
    }
}

fn run(seed: u64, budget: Duration) -> std::result::Result<(usize, Duration), (String, String)> {
    let mut rng = Rng(seed);
    let start = Instant::now();
    let setup = || -> Result<Chaos> {
        let cluster = Cluster::new(NODES)?;
        let mut etcd = EtcdCluster::start(&cluster.switch, &cluster.tag, &cluster.dir.0, MEMBERS)?;
        etcd.put(&format!("{PREFIX}/config"), UDP)?;
        etcd.put(FAKE_KEY, FAKE_VALUE)?;
        etcd.enable_auth(&format!("{PREFIX}/"))?;
        let mut chaos = Chaos {
            containers: Vec::new(),
            agents: Vec::new(),
            etcd,
            cluster,
            log: String::new(),
            start,
            longest: Duration::ZERO,
            faults: 0,
            down: vec![false; NODES],
        };
        for i in 0..NODES {
            let a = chaos.start_agent(i)?;
            chaos.agents.push(a);
        }
        for i in 0..NODES {
            chaos.agents[i].wait_ready(Duration::from_secs(60))?;
            // A pod behind cni0, attached by the real CNI plugins from the host's subnet.env.
            let env = SubnetEnv::read(&chaos.agents[i].subnet_file).context("subnet.env")?;
            let c = Container::attach(&chaos.cluster.hosts[i], &env)?;
            chaos.containers.push(c);
        }
        Ok(chaos)
    };
    let mut chaos = setup().map_err(|e| (format!("{e:#}"), String::new()))?;
    chaos.note(&format!("seed {seed}, budget {budget:?}"));
    let r = (|| -> Result<()> {
        chaos.recover(Instant::now())?;
        while start.elapsed() < budget {
            let fault = chaos.pick(&mut rng);
            let healed = chaos.inject(fault, &mut rng)?;
            chaos.recover(healed)?;
        }
        chaos.check_invariants()
    })();
    match r {
        Ok(()) => {
            chaos.note(&format!(
                "done: {} faults, longest recovery {:?}",
                chaos.faults, chaos.longest
            ));
            Ok((chaos.faults, chaos.longest))
        }
        Err(e) => Err((format!("{e:#}"), chaos.log.clone())),
    }
}

#[test]
fn chaos_agents_and_a_three_member_cluster_with_auth() {
    flannel_tests::require_root();
    let seed = seed_from_env("FLANNEL_CHAOS_SEED");
    let secs = std::env::var("FLANNEL_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    eprintln!("chaos seed {seed} (rerun with FLANNEL_CHAOS_SEED={seed})");
    let started = Instant::now();
    match run(seed, Duration::from_secs(secs)) {
        Ok((faults, longest)) => eprintln!(
            "chaos seed {seed}: {faults} faults, longest recovery {longest:?}, ran {:?}",
            started.elapsed()
        ),
        Err((e, log)) => panic!(
            "chaos seed {seed} failed (rerun with FLANNEL_CHAOS_SEED={seed}): {e}\nfaults injected:\n{log}"
        ),
    }
}
