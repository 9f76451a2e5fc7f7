//! The udp backend where it is deployed: pods behind `cni0`, default offloads (no ethtool
//! settings on the hosts beyond the harness's underlay mode), eBPF and TUN hosts mixed, with
//! and without `--ip-masq`, on both underlay modes; and an eBPF host that ignores routes
//! without carrier.

use flannel_tests::{Overlay, Underlay};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
/// Full-size segments and GSO super-packets both ways.
const BYTES: usize = 4 << 20;

/// Hosts 0 and 1 on eBPF with the decap `auto` picks for the underlay (TC on veth, where eth0
/// has GRO off; XDP on nic), hosts 2 and 3 on TUN (what an upstream node sends, the wire format
/// is the same): every ordered pair, so eBPF to eBPF, eBPF to TUN, TUN to eBPF and TUN to TUN,
/// pings and moves a verified TCP stream.
fn mixed_hosts(underlay: Underlay, ip_masq: bool) {
    let o = Overlay::builder(UDP, 4)
        .underlay(underlay)
        .ip_masq(ip_masq)
        .host_flags(0, &["--udp-dataplane=ebpf"])
        .host_flags(1, &["--udp-dataplane=ebpf"])
        .host_flags(2, &["--udp-dataplane=tun"])
        .host_flags(3, &["--udp-dataplane=tun"])
        .start()
        .unwrap();
    o.check_all_pairs(BYTES).unwrap();
    let picked = match underlay {
        Underlay::Veth => "decapsulating on TC ingress of eth0: GRO is off there",
        Underlay::Nic => "decapsulating with native XDP on eth0",
    };
    for i in 0..2 {
        let log = o.agent_log(i);
        assert!(log.contains(picked), "host {i} ({underlay:?}): {log}");
        // The labels agree with the lines (and the kernel matrix records them).
        let info = o.agents[i].dataplane_info().unwrap();
        o.agents[i].assert_logged_paths(&info);
    }
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

/// Both hosts decapsulate with native XDP (the harness's eth0 is a veth, which has it): all
/// pairs ping and move verified TCP, and each agent says which decap it chose.
fn xdp_receivers(underlay: Underlay, ip_masq: bool) {
    let o = Overlay::builder(UDP, 2)
        .underlay(underlay)
        .ip_masq(ip_masq)
        .flags(&["--udp-dataplane=ebpf", "--udp-decap=xdp"])
        .start()
        .unwrap();
    o.check_all_pairs(BYTES).unwrap();
    for i in 0..2 {
        let log = o.agent_log(i);
        assert!(
            log.contains("decapsulating with native XDP on eth0"),
            "host {i}: {log}"
        );
    }
}

#[test]
fn xdp_decap_hosts_talk_on_a_veth_underlay() {
    xdp_receivers(Underlay::Veth, true);
}

#[test]
fn xdp_decap_hosts_talk_on_a_nic_underlay() {
    xdp_receivers(Underlay::Nic, true);
}

#[test]
fn xdp_decap_hosts_talk_on_a_nic_underlay_with_the_bridge_masquerading() {
    xdp_receivers(Underlay::Nic, false);
}

/// An upstream-format sender (our TUN node: kernel UDP socket, finished or offloaded outer
/// checksums) to an XDP receiver, and back.
fn tun_and_xdp_hosts(underlay: Underlay) {
    let o = Overlay::builder(UDP, 2)
        .underlay(underlay)
        .host_flags(0, &["--udp-dataplane=ebpf", "--udp-decap=xdp"])
        .host_flags(1, &["--udp-dataplane=tun"])
        .start()
        .unwrap();
    o.check_all_pairs(BYTES).unwrap();
    let log = o.agent_log(0);
    assert!(
        log.contains("decapsulating with native XDP on eth0"),
        "{log}"
    );
}

#[test]
fn tun_host_talks_to_an_xdp_decap_host_on_a_veth_underlay() {
    tun_and_xdp_hosts(Underlay::Veth);
}

#[test]
fn tun_host_talks_to_an_xdp_decap_host_on_a_nic_underlay() {
    tun_and_xdp_hosts(Underlay::Nic);
}
