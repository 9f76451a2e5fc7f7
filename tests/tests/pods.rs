//! Pods the real way: containers attached to each host's `cni0` by the real CNI plugins with the
//! config flannel's CNI plugin renders from subnet.env; two on one host and one on another talk
//! over every data path; CNI DEL takes away what CNI ADD put in place.

use std::collections::BTreeSet;

use flannel_tests::{cni, Overlay, SubnetEnv};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOSTGW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
/// Enough for full-size segments and GSO super-packets.
const BYTES: usize = 4 << 20;

/// Two pods on host 0 (same bridge) and one on host 1: every ordered pair pings and moves a
/// verified TCP stream.
fn three_pods_talk(config: &str, flags: &[&str]) {
    let mut o = Overlay::builder(config, 2).flags(flags).start().unwrap();
    o.attach(0).unwrap();
    assert_eq!(o.on_host(0).count(), 2);
    let env = o.subnet_env(0).unwrap();
    for c in o.on_host(0) {
        let route = c.ns.ip(&["-4", "route", "show", "default"]).unwrap();
        let gw = env.subnet.split('/').next().unwrap();
        assert!(route.contains(&format!("via {gw} dev eth0")), "{route}");
    }
    let bridge = o.cluster.hosts[0]
        .ns
        .ip(&["-o", "link", "show", "master", cni::BRIDGE])
        .unwrap();
    assert_eq!(bridge.lines().count(), 2, "two ports on cni0: {bridge}");
    o.check_all_pairs(BYTES).unwrap();
}

#[test]
fn three_pods_talk_over_udp_ebpf() {
    three_pods_talk(UDP, &["--udp-dataplane=ebpf"]);
}

#[test]
fn three_pods_talk_over_udp_tun() {
    three_pods_talk(UDP, &["--udp-dataplane=tun"]);
}

#[test]
fn three_pods_talk_over_vxlan() {
    three_pods_talk(VXLAN, &[]);
}

#[test]
fn three_pods_talk_over_host_gw() {
    three_pods_talk(HOSTGW, &[]);
}

/// What a CNI plugin can change in a host namespace: links, IPv4 addresses and routes,
/// iptables rules (filter and nat).
fn host_state(o: &Overlay) -> BTreeSet<String> {
    let ns = &o.cluster.hosts[0].ns;
    let mut state = BTreeSet::new();
    for line in ns.ip(&["-o", "link", "show"]).unwrap().lines() {
        let name = line.split(':').nth(1).unwrap_or_default().trim();
        state.insert(format!("link {name}"));
    }
    for line in ns.ip(&["-o", "-4", "addr", "show"]).unwrap().lines() {
        let mut f = line.split_whitespace();
        let (dev, addr) = (f.nth(1).unwrap_or_default(), f.nth(1).unwrap_or_default());
        state.insert(format!("addr {dev} {addr}"));
    }
    for line in ns
        .ip(&["-4", "route", "show", "table", "all"])
        .unwrap()
        .lines()
    {
        state.insert(format!("route {line}"));
    }
    for table in ["filter", "nat"] {
        for line in ns
            .exec("iptables", &["-w", "-t", table, "-S"])
            .unwrap()
            .lines()
        {
            state.insert(format!("{table} {line}"));
        }
    }
    state
}

#[test]
fn cni_del_removes_what_cni_add_made() {
    // No flanneld masquerading: the bridge plugin adds its own NAT chain per container.
    let env = SubnetEnv {
        network: "10.244.0.0/16".into(),
        subnet: "10.244.7.1/24".into(),
        mtu: 1450,
        ipmasq: false,
    };
    let mut o = Overlay::hand_made(vec![env]).start().unwrap();
    let ipam = o.cluster.hosts[0].cni_data_dir().join(cni::NETWORK_NAME);
    // The first pod brings cni0 (the bridge plugin never removes it, by design).
    let first = o.containers[0].ip;
    assert!(ipam.join(first.to_string()).exists());
    let before = host_state(&o);
    assert!(
        before.contains(&format!("link {}", cni::BRIDGE)),
        "{before:#?}"
    );
    assert!(
        before.contains(&format!("addr {} 10.244.7.1/24", cni::BRIDGE)),
        "{before:#?}"
    );

    let i = o.attach(0).unwrap();
    let second = o.containers[i].ip;
    assert_ne!(second, first);
    let during = host_state(&o);
    let added: Vec<_> = during.difference(&before).collect();
    assert!(
        added.iter().any(|l| l.starts_with("link veth")),
        "a host-side veth: {added:#?}"
    );
    assert!(
        added
            .iter()
            .any(|l| l.starts_with("nat -A POSTROUTING") && l.contains(&format!("{second}/32"))),
        "the bridge plugin's masquerade jump for the pod: {added:#?}"
    );
    assert!(ipam.join(second.to_string()).exists());
    assert!(before.difference(&during).next().is_none());
    let pod = &o.containers[i];
    assert!(pod
        .ns
        .ip(&["-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap()
        .contains(&format!("inet {second}/24")));
    assert!(o.containers[0].ping(second, 2, 2).unwrap(), "pods on cni0");

    o.containers[i].detach().unwrap();
    assert_eq!(
        host_state(&o),
        before,
        "CNI DEL left or removed something in the host namespace"
    );
    assert!(
        !ipam.join(second.to_string()).exists(),
        "host-local released the address"
    );
    let links = o.containers[i].ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("eth0"), "the pod's eth0 is gone: {links}");
}
