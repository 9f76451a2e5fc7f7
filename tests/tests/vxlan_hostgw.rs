//! The vxlan and host-gw backends and the iptables rules, end to end: hosts in namespaces with a
//! container each, real etcd, real kernel devices, routes and netfilter.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use flannel_tests::{tcp_send, wait_for, Agent, Cluster, Netns, Overlay};

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOSTGW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";
const READY: Duration = Duration::from_secs(20);
/// The agents re-check devices and routes every 10 s.
const RESYNC: Duration = Duration::from_secs(15);

fn subnet_env_value(agent: &Agent, key: &str) -> String {
    agent.subnet_env_value(key).unwrap_or_default()
}

/// `n` hosts with `config` and a CNI-attached container each; every agent knows every other.
fn start(config: &str, n: usize) -> Overlay {
    Overlay::builder(config, n).start().unwrap()
}

/// Host `public_ip`'s lease: (key, raw value, parsed value).
fn lease_of(cluster: &Cluster, public_ip: Ipv4Addr) -> (String, String, serde_json::Value) {
    for kv in cluster.leases().unwrap() {
        let v: serde_json::Value = serde_json::from_str(&kv.value).unwrap();
        if v["PublicIP"] == public_ip.to_string() {
            return (kv.key, kv.value, v);
        }
    }
    panic!("no lease for {public_ip}");
}

/// Deletes host 2's lease in etcd; within 1 s of that, `removed` must hold on hosts 0 and 1
/// (`what` it waits for; `left` says what a host still has when it does not).
fn delete_host2_lease_then_within_a_second_on_the_others(
    net: &Overlay,
    what: &str,
    removed: impl Fn(&Netns) -> bool,
    left: impl Fn(&Netns) -> String,
) {
    let (key, _, _) = lease_of(&net.cluster, net.cluster.hosts[2].ip);
    assert!(key.starts_with(SUBNETS));
    net.cluster.etcd.del(&key).unwrap();
    let t = Instant::now();
    for h in 0..2 {
        let ns = &net.cluster.hosts[h].ns;
        let r = wait_for(
            Duration::from_secs(1).saturating_sub(t.elapsed()),
            what,
            || removed(ns).then_some(()),
        );
        assert!(r.is_ok(), "host {h} {}\n{}", left(ns), net.agents[h].log());
    }
}

fn device_mac(ns: &Netns, dev: &str) -> String {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["address"].as_str().unwrap().to_owned()
}

/// What host `ns` has installed for a peer: (neighbour, FDB, route) lines mentioning it.
fn vxlan_entries(ns: &Netns, subnet: &str, mac: &str) -> (bool, bool, bool) {
    let net = subnet.split('/').next().unwrap();
    let neigh = ns.ip(&["neigh", "show", "dev", "flannel.1"]).unwrap();
    let fdb = ns
        .exec("bridge", &["fdb", "show", "dev", "flannel.1"])
        .unwrap();
    let routes = ns.ip(&["route", "show", "dev", "flannel.1"]).unwrap();
    (
        neigh.lines().any(|l| {
            l.starts_with(&format!("{net} ")) && l.contains(mac) && l.contains("PERMANENT")
        }),
        fdb.lines()
            .any(|l| l.starts_with(mac) && l.contains("self") && l.contains("permanent")),
        routes
            .lines()
            .any(|l| l.starts_with(&format!("{subnet} via {net} ")) && l.contains("onlink")),
    )
}

#[test]
fn vxlan_three_hosts_full_mesh_and_peers_follow_etcd() {
    let mut net = start(VXLAN, 3);
    for (i, a) in net.agents.iter().enumerate() {
        assert_eq!(subnet_env_value(a, "FLANNEL_MTU"), "1450");
        let host = &net.cluster.hosts[i];
        let mac = device_mac(&host.ns, "flannel.1");
        let (_, _, lease) = lease_of(&net.cluster, host.ip);
        assert_eq!(lease["BackendType"], "vxlan");
        assert_eq!(
            lease["BackendData"],
            serde_json::json!({"VNI": 1, "VtepMAC": mac})
        );
        let link = host
            .ns
            .ip(&["-d", "link", "show", "dev", "flannel.1"])
            .unwrap();
        assert!(
            link.contains("mtu 1450") && link.contains("vxlan id 1") && link.contains("nolearning"),
            "{link}"
        );
        assert!(
            link.contains(&format!("local {}", host.ip)) && link.contains("dev eth0"),
            "{link}"
        );
        let addr = host
            .ns
            .ip(&["-4", "addr", "show", "dev", "flannel.1"])
            .unwrap();
        let own = a.subnet().unwrap().replace("/24", "/32");
        assert!(addr.contains(&format!("inet {own}")), "{addr}");
    }
    net.check_all_pairs(256 * 1024).unwrap();

    // Host 2's entries on the others, then its lease deleted in etcd: gone within 1 s.
    let gone_subnet = net.agents[2].subnet().unwrap();
    let gone_mac = device_mac(&net.cluster.hosts[2].ns, "flannel.1");
    for h in 0..2 {
        assert_eq!(
            vxlan_entries(&net.cluster.hosts[h].ns, &gone_subnet, &gone_mac),
            (true, true, true)
        );
    }
    delete_host2_lease_then_within_a_second_on_the_others(
        &net,
        "peer entries removed",
        |ns| vxlan_entries(ns, &gone_subnet, &gone_mac) == (false, false, false),
        |ns| {
            let left = vxlan_entries(ns, &gone_subnet, &gone_mac);
            format!("still has {left:?} for {gone_subnet}")
        },
    );
    // Deleting its own key makes that node exit (by design); the others keep working.
    net.agents[2].wait_exit(Duration::from_secs(5)).unwrap();
    assert!(net.containers[0].ping(net.containers[1].ip, 2, 2).unwrap());
    let other = net.agents[0].subnet().unwrap();
    assert_eq!(
        vxlan_entries(
            &net.cluster.hosts[1].ns,
            &other,
            &device_mac(&net.cluster.hosts[0].ns, "flannel.1")
        ),
        (true, true, true)
    );

    // Entries left by a peer that went away while this agent was down are dropped after restart.
    net.agents[0].stop().unwrap();
    let ns0 = &net.cluster.hosts[0].ns;
    let (stale_mac, stale_subnet) = ("0e:f1:c6:33:64:01", "10.244.250.0/24");
    ns0.ip(&[
        "neigh",
        "replace",
        "10.244.250.0",
        "lladdr",
        stale_mac,
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ])
    .unwrap();
    ns0.exec(
        "bridge",
        &[
            "fdb",
            "append",
            stale_mac,
            "dev",
            "flannel.1",
            "dst",
            "198.51.100.1",
            "self",
            "permanent",
        ],
    )
    .unwrap();
    ns0.ip(&[
        "route",
        "replace",
        stale_subnet,
        "via",
        "10.244.250.0",
        "dev",
        "flannel.1",
        "onlink",
    ])
    .unwrap();
    assert_eq!(
        vxlan_entries(ns0, stale_subnet, stale_mac),
        (true, true, true)
    );
    net.start_agent(0).unwrap();
    let ns0 = &net.cluster.hosts[0].ns;
    let r = wait_for(RESYNC, "stale entries pruned", || {
        (vxlan_entries(ns0, stale_subnet, stale_mac) == (false, false, false)).then_some(())
    });
    assert!(
        r.is_ok(),
        "{:?}\n{}",
        vxlan_entries(ns0, stale_subnet, stale_mac),
        net.agents[0].log()
    );
    let s1 = net.agents[1].subnet().unwrap();
    let mac1 = device_mac(&net.cluster.hosts[1].ns, "flannel.1");
    assert_eq!(vxlan_entries(ns0, &s1, &mac1), (true, true, true));
    assert!(net.containers[0].ping(net.containers[1].ip, 2, 2).unwrap());
}

#[test]
fn vxlan_device_comes_back_and_vtep_mac_survives_restarts() {
    let mut net = start(VXLAN, 2);
    let h0 = &net.cluster.hosts[0];
    let mac = device_mac(&h0.ns, "flannel.1");
    assert!(net.containers[0].ping(net.containers[1].ip, 1, 2).unwrap());

    // Deleted by hand: recreated with the same MAC and its peer entries by the resync.
    h0.ns.ip(&["link", "del", "flannel.1"]).unwrap();
    assert!(!net.containers[0].ping(net.containers[1].ip, 1, 1).unwrap());
    let (c0, c1) = (&net.containers[0], &net.containers[1]);
    let back = wait_for(RESYNC, "device recreated and traffic flowing", || {
        c0.ping(c1.ip, 1, 1).ok()?.then_some(())
    });
    assert!(back.is_ok(), "{}", net.agents[0].log());
    assert_eq!(device_mac(&h0.ns, "flannel.1"), mac);
    assert!(
        net.agents[0].log().contains("disappeared"),
        "{}",
        net.agents[0].log()
    );

    // Restarted: same MAC on the device and in the lease; the peer's entries stay valid.
    net.agents[0].stop().unwrap();
    net.start_agent(0).unwrap();
    let h0 = &net.cluster.hosts[0];
    assert_eq!(device_mac(&h0.ns, "flannel.1"), mac);
    assert_eq!(
        lease_of(&net.cluster, h0.ip).2["BackendData"]["VtepMAC"],
        mac
    );
    assert!(net.containers[0].ping(net.containers[1].ip, 3, 2).unwrap());

    // Restarted without its device: the MAC is derived, not random, so it is the same again.
    net.agents[0].stop().unwrap();
    h0.ns.ip(&["link", "del", "flannel.1"]).unwrap();
    net.start_agent(0).unwrap();
    let h0 = &net.cluster.hosts[0];
    assert_eq!(device_mac(&h0.ns, "flannel.1"), mac);
    let subnet0 = net.agents[0].subnet().unwrap();
    assert_eq!(
        vxlan_entries(&net.cluster.hosts[1].ns, &subnet0, &mac),
        (true, true, true)
    );
    let fdb = net.cluster.hosts[1]
        .ns
        .exec("bridge", &["fdb", "show", "dev", "flannel.1"])
        .unwrap();
    assert_eq!(
        fdb.lines().filter(|l| l.contains("dst")).count(),
        1,
        "one peer, one FDB entry: {fdb}"
    );
    let (c0, c1) = (&net.containers[0], &net.containers[1]);
    assert!(wait_for(Duration::from_secs(5), "ping", || c0
        .ping(c1.ip, 1, 1)
        .ok()?
        .then_some(()))
    .is_ok());
}

fn hostgw_route(ns: &Netns, subnet: &str, via: Ipv4Addr) -> bool {
    let routes = ns.ip(&["route", "show", subnet]).unwrap();
    routes
        .lines()
        .any(|l| l.starts_with(&format!("{subnet} via {via} dev eth0")))
}

#[test]
fn hostgw_three_hosts_full_mesh_and_routes_follow_etcd() {
    let mut net = start(HOSTGW, 3);
    for (i, a) in net.agents.iter().enumerate() {
        assert_eq!(subnet_env_value(a, "FLANNEL_MTU"), "1500");
        let (_, raw, _) = lease_of(&net.cluster, net.cluster.hosts[i].ip);
        assert_eq!(
            raw,
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"host-gw"}}"#,
                net.cluster.hosts[i].ip
            )
        );
    }
    net.check_all_pairs(256 * 1024).unwrap();

    // A route deleted by hand is put back by the periodic check.
    let s1 = net.agents[1].subnet().unwrap();
    let ip1 = net.cluster.hosts[1].ip;
    let ns0 = &net.cluster.hosts[0].ns;
    assert!(hostgw_route(ns0, &s1, ip1));
    ns0.ip(&["route", "del", &s1]).unwrap();
    let back = wait_for(RESYNC, "route restored", || {
        hostgw_route(ns0, &s1, ip1).then_some(())
    });
    assert!(back.is_ok(), "{}", net.agents[0].log());

    // Host 2's lease deleted: its routes disappear from the others within 1 s.
    let s2 = net.agents[2].subnet().unwrap();
    let ip2 = net.cluster.hosts[2].ip;
    delete_host2_lease_then_within_a_second_on_the_others(
        &net,
        "route removed",
        |ns| !hostgw_route(ns, &s2, ip2),
        |_| format!("still routes {s2}"),
    );
    net.agents[2].wait_exit(Duration::from_secs(5)).unwrap();

    // host-gw refuses a public IP that is not the interface's address.
    let mut bad = net
        .cluster
        .start_agent(2, &["--public-ip=198.51.100.9"])
        .unwrap();
    let st = bad.wait_exit(READY).unwrap();
    assert!(!st.success());
    assert!(
        bad.log().contains("host-gw needs the public IP"),
        "{}",
        bad.log()
    );
}

fn iptables_save(ns: &Netns) -> String {
    ns.exec("iptables-save", &[]).unwrap()
}

/// Host 0 ran before with another network: its rules must be cleaned up.
fn host0_ran_before_with_another_network(cluster: &Cluster) -> flannel_tests::Result<()> {
    let h0 = &cluster.hosts[0];
    std::fs::write(
        h0.dir.join("subnet.env"),
        "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )?;
    for rule in [
        &["-t", "nat", "-N", "FLANNEL-POSTRTG"][..],
        &[
            "-t",
            "nat",
            "-A",
            "FLANNEL-POSTRTG",
            "!",
            "-s",
            "10.1.0.0/16",
            "-d",
            "10.1.3.0/24",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "RETURN",
        ],
        &["-t", "filter", "-N", "FLANNEL-FWD"],
        &[
            "-t",
            "filter",
            "-A",
            "FLANNEL-FWD",
            "-s",
            "10.1.0.0/16",
            "-m",
            "comment",
            "--comment",
            "flanneld forward",
            "-j",
            "ACCEPT",
        ],
    ] {
        h0.ns.exec("iptables", &[&["-w"][..], rule].concat())?;
    }
    anyhow::ensure!(iptables_save(&h0.ns).contains("10.1.3.0/24"));
    Ok(())
}

#[test]
fn ip_masq_hides_containers_outside_the_overlay_with_upstreams_rules() {
    // Containers come once the rules have been checked: these are in place as soon as ready.
    let mut o = Overlay::builder(VXLAN, 2)
        .flags(&["--ip-masq", "--iptables-resync=1"])
        .containers_per_host(0)
        .before_agents(host0_ran_before_with_another_network)
        .start()
        .unwrap();
    let (cluster, agents) = (&o.cluster, &o.agents);
    let h0 = &cluster.hosts[0];
    // Rules are in place as soon as the node is ready.
    let subnet0 = agents[0].subnet().unwrap();
    let saved = iptables_save(&h0.ns);
    for line in [
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD".to_owned(),
        "-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT".to_owned(),
        "-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment \"flanneld forward\" -j ACCEPT".to_owned(),
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG".to_owned(),
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN".to_owned(),
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN".to_owned(),
        "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully".to_owned(),
        format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d {subnet0} -m comment --comment \"flanneld masq\" -j RETURN"),
        "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully".to_owned(),
    ] {
        assert!(saved.contains(&line), "missing {line:?} in\n{saved}");
    }
    assert!(
        !saved.contains("10.1."),
        "stale rules of the previous network left:\n{saved}"
    );
    let chain: Vec<&str> = saved
        .lines()
        .filter(|l| l.starts_with("-A FLANNEL-POSTRTG"))
        .collect();
    assert_eq!(chain.len(), 5, "upstream's five rules in order: {chain:#?}");
    assert!(
        chain[2].contains("MASQUERADE") && chain[3].contains("RETURN"),
        "{chain:#?}"
    );

    // An address outside the overlay sees the container as its host.
    let outside = Netns::create(&format!("{}-out", cluster.tag)).unwrap();
    cluster
        .switch
        .ip(&[
            "link", "add", "out0", "type", "veth", "peer", "name", "eth0",
        ])
        .unwrap();
    cluster
        .switch
        .ip(&[
            "link",
            "set",
            "eth0",
            "netns",
            &outside.path().to_string_lossy(),
        ])
        .unwrap();
    cluster
        .switch
        .ip(&["link", "set", "out0", "master", "br0", "up"])
        .unwrap();
    outside
        .ip(&["addr", "add", "192.0.2.200/24", "dev", "eth0"])
        .unwrap();
    outside.ip(&["link", "set", "eth0", "up"]).unwrap();
    o.attach(0).unwrap();
    o.attach(1).unwrap();
    let (h0, agents, containers) = (&o.cluster.hosts[0], &o.agents, &o.containers);
    let far: Ipv4Addr = "192.0.2.200".parse().unwrap();
    let seen = tcp_send(&containers[0].ns, &outside, far, 64 * 1024).unwrap();
    assert_eq!(
        seen.client,
        std::net::IpAddr::V4(h0.ip),
        "masqueraded to the host address"
    );
    // Inside the overlay there is no NAT.
    let ok = wait_for(Duration::from_secs(5), "overlay ping", || {
        containers[0]
            .ping(containers[1].ip, 1, 1)
            .ok()?
            .then_some(())
    });
    assert!(ok.is_ok(), "{}", agents[0].log());
    let seen = tcp_send(
        &containers[0].ns,
        &containers[1].ns,
        containers[1].ip,
        64 * 1024,
    )
    .unwrap();
    assert_eq!(seen.client, std::net::IpAddr::V4(containers[0].ip));

    // Rules flushed by hand come back within the resync period.
    h0.ns
        .exec("iptables", &["-w", "-t", "nat", "-F", "FLANNEL-POSTRTG"])
        .unwrap();
    h0.ns
        .exec(
            "iptables",
            &[
                "-w",
                "-t",
                "filter",
                "-D",
                "FORWARD",
                "-m",
                "comment",
                "--comment",
                "flanneld forward",
                "-j",
                "FLANNEL-FWD",
            ],
        )
        .unwrap();
    let back = wait_for(Duration::from_secs(5), "rules restored", || {
        let s = iptables_save(&h0.ns);
        (s.lines()
            .filter(|l| l.starts_with("-A FLANNEL-POSTRTG"))
            .count()
            == 5
            && s.contains("-A FORWARD -m comment"))
        .then_some(())
    });
    assert!(
        back.is_ok(),
        "{}\n{}",
        iptables_save(&h0.ns),
        agents[0].log()
    );
    let seen = tcp_send(&containers[0].ns, &outside, far, 1024).unwrap();
    assert_eq!(seen.client, std::net::IpAddr::V4(h0.ip));
}
