//! The udp backend where it is deployed: pods behind `cni0`, default offloads (no ethtool
//! settings on the hosts beyond the harness's underlay mode), eBPF and TUN hosts mixed, with
//! and without `--ip-masq`, on both underlay modes; and an eBPF host that ignores routes
//! without carrier.

use flannel_tests::{Overlay, Underlay};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
/// Full-size segments and GSO super-packets both ways.
const BYTES: usize = 4 << 20;

/// Host 0 on eBPF, host 1 on TUN (what an upstream node sends, the wire format is the same):
/// all pairs ping and move a verified TCP stream.
fn mixed_hosts(underlay: Underlay, ip_masq: bool) {
    let o = Overlay::builder(UDP, 2)
        .underlay(underlay)
        .ip_masq(ip_masq)
        .host_flags(0, &["--udp-dataplane=ebpf"])
        .host_flags(1, &["--udp-dataplane=tun"])
        .start()
        .unwrap();
    o.check_all_pairs(BYTES).unwrap();
}

#[test]
fn ebpf_and_tun_hosts_talk_on_a_veth_underlay() {
    mixed_hosts(Underlay::Veth, true);
}

#[test]
fn ebpf_and_tun_hosts_talk_on_a_veth_underlay_with_the_bridge_masquerading() {
    mixed_hosts(Underlay::Veth, false);
}

#[test]
fn ebpf_and_tun_hosts_talk_on_a_nic_underlay() {
    mixed_hosts(Underlay::Nic, true);
}

#[test]
fn ebpf_and_tun_hosts_talk_on_a_nic_underlay_with_the_bridge_masquerading() {
    mixed_hosts(Underlay::Nic, false);
}

#[test]
fn ebpf_hosts_forward_where_routes_without_carrier_are_ignored() {
    let o = Overlay::builder(UDP, 2)
        .flags(&["--udp-dataplane=ebpf"])
        .before_agents(|c| {
            for h in &c.hosts {
                h.ns.sysctl("net.ipv4.conf.all.ignore_routes_with_linkdown", "1")?;
            }
            Ok(())
        })
        .start()
        .unwrap();
    for h in &o.cluster.hosts {
        let link = h.ns.ip(&["-o", "link", "show", "flannel0"]).unwrap();
        assert!(link.contains("LOWER_UP"), "flannel0 has carrier: {link}");
        let route = h.ns.ip(&["-4", "route", "show", "10.244.0.0/16"]).unwrap();
        assert!(!route.contains("linkdown"), "{route}");
    }
    o.check_all_pairs(BYTES).unwrap();
}
