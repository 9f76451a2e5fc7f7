//! The udp backend end to end: three hosts with a CNI-attached container each, real etcd, real
//! packets, with the eBPF data plane, the TUN data plane, and both mixed.

use std::time::{Duration, Instant};

use flannel_tests::{wait_for, Overlay};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";

/// One host per entry of `dataplanes` (`ebpf` or `tun`), a CNI-attached container on each.
fn overlay(dataplanes: &[&str]) -> Overlay {
    let mut b = Overlay::builder(UDP, dataplanes.len());
    for (i, dp) in dataplanes.iter().enumerate() {
        b = b.host_flags(i, &[&format!("--udp-dataplane={dp}")]);
    }
    let o = b.start().unwrap();
    for (i, a) in o.agents.iter().enumerate() {
        assert_eq!(a.mtu().expect("FLANNEL_MTU in subnet.env"), 1500 - 28);
        // The data plane in use, as /metrics reports it (sampled once a second).
        let want = format!("flannel_dataplane_info{{kind=\"{}\"}} 1", dataplanes[i]);
        wait_for(
            Duration::from_secs(5),
            "the data plane kind in /metrics",
            || {
                let (_, body) = a.http_get("/metrics").ok()?;
                body.lines().any(|l| l == want).then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("host {i}: expected {want}: {e}\n{}", a.log()));
    }
    o
}

#[test]
fn ebpf_all_pairs_ping_and_tcp() {
    let o = overlay(&["ebpf", "ebpf", "ebpf"]);
    // Large enough for full-size segments and GSO super-packets.
    o.check_all_pairs(4 << 20).unwrap();
}

#[test]
fn tun_all_pairs_ping_and_tcp() {
    let o = overlay(&["tun", "tun", "tun"]);
    o.check_all_pairs(4 << 20).unwrap();
}

#[test]
fn mixed_ebpf_and_tun_hosts_interoperate() {
    let o = overlay(&["ebpf", "ebpf", "tun"]);
    o.check_all_pairs(4 << 20).unwrap();
}

fn pinned_peer_subnets(o: &Overlay, host: usize) -> Vec<String> {
    o.cluster.hosts[host].pinned_peer_subnets().unwrap()
}

#[test]
fn deleting_a_lease_stops_traffic_within_a_second_and_removes_the_map_entry() {
    let mut o = overlay(&["ebpf", "ebpf", "ebpf"]);
    let victim_subnet = o.agents[2].subnet().unwrap();
    let victim_net = victim_subnet.split('/').next().unwrap().to_owned();
    assert!(
        pinned_peer_subnets(&o, 0).contains(&victim_net),
        "map has the peer before"
    );
    assert!(o.containers[0].ping(o.containers[2].ip, 1, 2).unwrap());
    let t = Instant::now();
    o.cluster
        .etcd
        .del(&format!("{SUBNETS}{}", victim_subnet.replace('/', "-")))
        .unwrap();
    wait_for(Duration::from_secs(1), "map entry removed", || {
        (!pinned_peer_subnets(&o, 0).contains(&victim_net)).then_some(())
    })
    .unwrap();
    let removed_after = t.elapsed();
    assert!(removed_after < Duration::from_secs(1), "{removed_after:?}");
    assert!(
        !o.containers[0].ping(o.containers[2].ip, 2, 1).unwrap(),
        "traffic to a deleted lease must stop"
    );
    // The others still talk.
    assert!(o.containers[0].ping(o.containers[1].ip, 2, 2).unwrap());
    let _ = o.agents[2].wait_exit(Duration::from_secs(5));
}

/// Capture one encapsulated packet leaving the sending host's underlay and check every
/// header. (Captured as sent: on a receiver with XDP decap, which `auto` picks on the `nic`
/// underlay, packet sockets on eth0 see incoming packets already decapsulated.)
#[test]
fn wire_format_is_upstreams() {
    let o = overlay(&["ebpf", "tun"]);
    for (sender, receiver) in [(0usize, 1usize), (1, 0)] {
        let pcap = o.cluster.hosts[sender]
            .dir
            .join(format!("cap{sender}.pcap"));
        let mut tcpdump = o.cluster.hosts[sender]
            .ns
            .command("tcpdump")
            .args(["-i", "eth0", "-Q", "out", "-U", "-c", "1", "-w"])
            .arg(&pcap)
            .args(["udp and src port 8285 and dst port 8285"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tcpdump (installed by cargo xtask setup)");
        let src = &o.containers[sender];
        let dst = &o.containers[receiver];
        // tcpdump needs a moment to attach: keep pinging until it has its packet.
        let got = wait_for(Duration::from_secs(10), "tcpdump to capture", || {
            let _ = src.ping(dst.ip, 1, 1);
            tcpdump.try_wait().ok().flatten()
        })
        .unwrap();
        assert!(got.success());
        let bytes = std::fs::read(&pcap).unwrap();
        // pcap global header 24 bytes, record header 16, then Ethernet.
        let frame = &bytes[24 + 16..];
        assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4 ethertype");
        let outer = &frame[14..];
        assert_eq!(outer[0], 0x45, "outer IPv4, no options");
        assert_eq!(outer[9], 17, "outer protocol UDP");
        assert_eq!(outer[6] & 0x40, 0x40, "outer DF set (sender {sender})");
        assert_eq!(&outer[12..16], &o.cluster.hosts[sender].ip.octets());
        assert_eq!(&outer[16..20], &o.cluster.hosts[receiver].ip.octets());
        let udp = &outer[20..];
        assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 8285);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 8285);
        let inner = &udp[8..];
        assert_eq!(
            u16::from_be_bytes([udp[4], udp[5]]) as usize,
            8 + u16::from_be_bytes([inner[2], inner[3]]) as usize,
            "UDP length = 8 + inner packet"
        );
        assert_eq!(
            inner[0] >> 4,
            4,
            "payload is the inner IPv4 packet, no extra header"
        );
        assert_eq!(&inner[12..16], &src.ip.octets());
        assert_eq!(&inner[16..20], &dst.ip.octets());
        assert_eq!(inner[9], 1, "inner ICMP");
    }
}
