//! The demo: a real etcd and three hosts in network namespaces, each running flanneld with the
//! udp backend (eBPF data plane) and a container; prints the leases, each host's subnet.env and
//! peers, the pinned peer map, pings between all containers, then a short eBPF-vs-TUN run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flannel_tests::{Cluster, Container};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":8285}}"#;

pub fn run(flanneld: &Path) -> Result<()> {
    std::env::set_var("FLANNELD_BIN", flanneld);
    println!("== demo: etcd + 3 hosts in network namespaces (underlay 192.0.2.0/24)");
    let cluster = Cluster::new(3).context("bringing up the demo cluster")?;
    println!(
        "etcd at {} (namespace {})",
        cluster.etcd.endpoint(),
        cluster.switch.name
    );
    cluster.set_config(CONFIG)?;
    println!("config: {CONFIG}");
    let mut agents = Vec::new();
    for i in 0..cluster.hosts.len() {
        agents.push(cluster.start_agent(i, &[])?);
    }
    for a in agents.iter_mut() {
        a.wait_ready(Duration::from_secs(20))?;
    }
    println!("\n== leases in etcd (etcdctl get --prefix /coreos.com/network/subnets/)");
    for kv in cluster.leases()? {
        println!("{}  etcd lease {:x}\n    {}", kv.key, kv.lease, kv.value);
    }
    let mut containers = Vec::new();
    for (host, agent) in cluster.hosts.iter().zip(&agents) {
        println!("\n== {} ({}) subnet.env", host.ns.name, host.ip);
        let env = std::fs::read_to_string(&agent.subnet_file)?;
        print!("{env}");
        let mtu = agent.mtu().context("FLANNEL_MTU in subnet.env")?;
        let peers = flannel_tests::wait_for(Duration::from_secs(5), "peers", || {
            agent
                .peers()
                .ok()
                .filter(|p| p.len() == cluster.hosts.len() - 1)
        })?;
        for (subnet, ip) in peers {
            println!("peer {subnet} at {ip}");
        }
        containers.push(Container::create(
            host,
            &agent.subnet().context("subnet")?,
            mtu,
        )?);
    }
    let pin = format!("{}/flannel_peers", cluster.hosts[0].pin_dir());
    println!("\n== bpftool map dump pinned {pin}");
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned", &pin])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n== ping between all containers (through the eBPF data plane)");
    let mut failures = 0;
    for a in &containers {
        for b in &containers {
            if a.ip != b.ip {
                let ok = a.ping(b.ip, 3, 2)?;
                println!("{} -> {}: {}", a.ip, b.ip, if ok { "ok" } else { "FAILED" });
                failures += usize::from(!ok);
            }
        }
    }
    let stats = format!("{}/flannel_stats", cluster.hosts[0].pin_dir());
    println!("\n== bpftool map dump pinned {stats}  (per-CPU counters)");
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned", &stats])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    for a in agents.iter_mut() {
        a.stop()?;
    }
    drop(containers);
    drop(cluster);
    if failures > 0 {
        bail!("{failures} pings failed");
    }

    println!("\n== short eBPF-vs-TUN comparison (iperf3, 3 s each; `cargo xtask bench` for the full table)");
    crate::bench::run_short(flanneld, 3)?;
    println!("\n== demo done; namespaces, pins and etcd removed");
    Ok(())
}
