//! The demo: a real etcd and three hosts in network namespaces, each running flanneld with the
//! udp backend (eBPF data plane) and a container attached by the real CNI plugins; prints the
//! leases, each host's subnet.env, peers and CNI config, the pinned peer map, pings between all
//! containers, then a short eBPF-vs-TUN run.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use flannel_tests::Overlay;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":8285}}"#;

pub fn run(flanneld: &Path) -> Result<()> {
    std::env::set_var("FLANNELD_BIN", flanneld);
    println!("== demo: etcd + 3 hosts in network namespaces (underlay 192.0.2.0/24)");
    println!("config: {CONFIG}");
    let o = Overlay::builder(CONFIG, 3)
        .start()
        .context("bringing up the demo overlay")?;
    let cluster = &o.cluster;
    println!(
        "etcd at {} (namespace {}); flanneld --ip-masq on each host",
        cluster.etcd.endpoint(),
        cluster.switch.name
    );
    println!("\n== leases in etcd (etcdctl get --prefix /coreos.com/network/subnets/)");
    for kv in cluster.leases()? {
        println!("{}  etcd lease {:x}\n    {}", kv.key, kv.lease, kv.value);
    }
    for ((host, agent), c) in cluster.hosts.iter().zip(&o.agents).zip(&o.containers) {
        println!("\n== {} ({}) subnet.env", host.ns.name, host.ip);
        print!("{}", std::fs::read_to_string(&agent.subnet_file)?);
        for (subnet, ip) in agent.peers()? {
            println!("peer {subnet} at {ip}");
        }
        println!(
            "CNI config (what flannel's CNI plugin hands the bridge plugin):\n    {}",
            c.attachment.config()
        );
        println!("container {} attached to cni0 as {}", c.ns.name, c.ip);
    }
    let pin = format!("{}/flannel_peers", cluster.hosts[0].pin_dir());
    println!("\n== bpftool map dump pinned {pin}");
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned", &pin])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n== ping between all containers (through the eBPF data plane)");
    let mut failures = 0;
    for a in &o.containers {
        for b in &o.containers {
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
    drop(o);
    if failures > 0 {
        bail!("{failures} pings failed");
    }

    println!("\n== short eBPF-vs-TUN comparison (iperf3, 3 s each; `cargo xtask bench` for the full table)");
    crate::bench::run_short(flanneld, 3)?;
    println!("\n== demo done; containers (CNI DEL), namespaces, pins and etcd removed");
    Ok(())
}
