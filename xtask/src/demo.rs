//! The demo: a real etcd and three hosts in network namespaces, each running flanneld; prints
//! the leases in etcd, each host's subnet.env and each host's view of its peers.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use flannel_tests::Cluster;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#;

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
        println!("{}  lease={:x}\n    {}", kv.key, kv.lease, kv.value);
    }
    for (host, agent) in cluster.hosts.iter().zip(&agents) {
        println!("\n== {} ({}) subnet.env", host.ns.name, host.ip);
        print!("{}", std::fs::read_to_string(&agent.subnet_file)?);
        let peers = flannel_tests::wait_for(Duration::from_secs(5), "peers", || {
            agent
                .peers()
                .ok()
                .filter(|p| p.len() == cluster.hosts.len() - 1)
        })?;
        for (subnet, ip) in peers {
            println!("peer {subnet} at {ip}");
        }
    }
    for a in agents.iter_mut() {
        a.stop()?;
    }
    println!("\n== demo done; namespaces and etcd removed");
    Ok(())
}
