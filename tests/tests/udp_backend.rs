//! The udp backend end to end: three hosts with a CNI-attached container each, real etcd, real
//! packets, with the eBPF data plane, the TUN data plane, and both mixed.

use std::time::{Duration, Instant};

use flannel_tests::pktgen::{ether_between, ipv4, udp, vxlan, ETH_P_IP, PROTO_UDP, SRC_MAC};
use flannel_tests::{tc, wait_for, Agent, Cluster, Overlay};

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
        // The data plane in use, as /metrics reports it, and for eBPF the paths it chose
        // here, each logged with its reason.
        let info = a
            .dataplane_info()
            .unwrap_or_else(|e| panic!("host {i}: {e}"));
        assert_eq!(
            info.get("kind").map(String::as_str),
            Some(dataplanes[i]),
            "host {i}: {info:?}"
        );
        if dataplanes[i] == "ebpf" {
            a.assert_logged_paths(&info);
        } else {
            assert_eq!(info.len(), 1, "TUN has no eBPF paths: {info:?}");
        }
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

/// `ip -j link show flannel0` on `host`: (ifindex, MAC).
fn flannel0(o: &Overlay, host: usize) -> (u64, [u8; 6]) {
    let out = o.cluster.hosts[host]
        .ns
        .ip(&["-j", "link", "show", "flannel0"])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let link = &v[0];
    let mac: Vec<u8> = link["address"]
        .as_str()
        .unwrap_or_else(|| panic!("flannel0 has no MAC: {out}"))
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    (link["ifindex"].as_u64().unwrap(), mac.try_into().unwrap())
}

/// The value of the /metrics line `name` on `host`'s agent.
fn metric(o: &Overlay, host: usize, name: &str) -> Option<u64> {
    let (_, body) = o.agents[host].http_get("/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// flannel0's address on `host` (its subnet's network address).
fn flannel0_ip(o: &Overlay, host: usize) -> std::net::Ipv4Addr {
    let subnet = o.agents[host].subnet().unwrap();
    subnet.split('/').next().unwrap().parse().unwrap()
}

/// From container `from`, sends each of `dsts` (port 8285) a VXLAN datagram (VNI 1, to the
/// MAC of flannel0 on `from`'s host) carrying UDP to `target`:7777 from `claimed_src`, and
/// waits until that host's /metrics counts each as an unverified drop (sampled once a second).
fn send_forged_vxlan(
    o: &Overlay,
    from: &flannel_tests::Container,
    claimed_src: std::net::Ipv4Addr,
    target: std::net::Ipv4Addr,
    dsts: &[std::net::Ipv4Addr],
) {
    let host = from.host;
    let (_, mac) = flannel0(o, host);
    let forged_inner = ipv4(
        claimed_src,
        target,
        64,
        PROTO_UDP,
        &[],
        &udp(40000, 7777, b"forged"),
    );
    let datagram = vxlan(1, &ether_between(mac, SRC_MAC, ETH_P_IP, &forged_inner));
    let before = metric(o, host, UNVERIFIED).expect("unverified drops in /metrics");
    let dsts = dsts.to_vec();
    let n = from.ns.enter(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut sent = 0u64;
        for dst in dsts {
            match s.send_to(&datagram, (dst, 8285)) {
                Ok(_) => sent += 1,
                // Older kernels (5.10 of the matrix) route a subnet's all-zeros address
                // (flannel0's, 10.244.X.0) as broadcast: no unicast can be sent there.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    eprintln!("{dst} is a broadcast address on this kernel: not sent")
                }
                Err(e) => panic!("sending to {dst}: {e}"),
            }
        }
        sent
    });
    assert!(n > 0, "no forged datagram could be sent");
    wait_for(Duration::from_secs(5), "the unverified drops", || {
        (metric(o, host, UNVERIFIED)? >= before + n).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", o.agent_log(host)));
}

const UNVERIFIED: &str = "flannel_dataplane_drops_total{reason=\"unverified\"}";

/// flannel0's guard on host 0 works: nothing genuine was dropped as unverified so far, and
/// VXLAN from host 0's container to the host and to flannel0, posing as host 1's container, is.
fn assert_guard_holds_on_host0(o: &Overlay) {
    assert_eq!(metric(o, 0, UNVERIFIED), Some(0), "{}", o.agent_log(0));
    let (peer_pod, own_pod) = (o.containers[1].ip, o.containers[0].ip);
    let host_ip = o.cluster.hosts[0].ip;
    send_forged_vxlan(
        o,
        &o.containers[0],
        peer_pod,
        own_pod,
        &[host_ip, flannel0_ip(o, 0)],
    );
}

/// flannel0 is a kernel VXLAN device listening on the udp port on every address of the host:
/// a pod sending VXLAN to its host (underlay address or flannel0's) must not get a packet
/// into the overlay that poses as coming from a peer's pod.
#[test]
fn a_pod_cannot_inject_vxlan_posing_as_a_peers_pod() {
    let o = Overlay::builder(UDP, 2)
        .flags(&["--udp-dataplane=ebpf"])
        .containers_per_host(2)
        .start()
        .unwrap();
    let mut on_host0 = o.on_host(0);
    let (attacker, target) = (on_host0.next().unwrap(), on_host0.next().unwrap());
    let peer_pod = o.container(1);
    let target_ip = target.ip;
    let listener = target.ns.enter(move || {
        let s = std::net::UdpSocket::bind((target_ip, 7777)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s
    });
    let recv = || {
        let mut buf = [0u8; 64];
        listener
            .recv_from(&mut buf)
            .ok()
            .map(|(n, from)| (buf[..n].to_vec(), from.ip()))
    };

    // The forgery, UDP to the target "from" the peer's pod, sent to the host's underlay
    // address and to flannel0's: both reach flannel0's VXLAN receive and are dropped there.
    let host_ip = o.cluster.hosts[0].ip;
    send_forged_vxlan(
        &o,
        attacker,
        peer_pod.ip,
        target_ip,
        &[host_ip, flannel0_ip(&o, 0)],
    );
    assert_eq!(recv(), None, "the forged datagram reached the target pod");

    // The real peer pod still gets through, with its own address.
    let peer_ip = peer_pod.ip;
    peer_pod.ns.enter(move || {
        let s = std::net::UdpSocket::bind((peer_ip, 0)).unwrap();
        s.send_to(b"genuine", (target_ip, 7777)).unwrap();
    });
    let got = wait_for(Duration::from_secs(5), "the genuine datagram", recv).unwrap();
    assert_eq!(got, (b"genuine".to_vec(), std::net::IpAddr::V4(peer_ip)));
    o.check_all_pairs(1 << 20).unwrap();
}

/// Classic TC (`--udp-attach=tc`, what `auto` picks on kernels without TCX): every pair talks,
/// each hook carries exactly our cls_bpf filter and no TCX program, each agent logs the choice,
/// and flannel0's guard still works: decap's token reaches it through `tc_index` (cls_bpf
/// direct-action sets it on TC_ACT_OK, as TCX does), so real traffic is never dropped as
/// unverified while forged VXLAN is.
#[test]
fn ebpf_with_classic_tc_all_pairs_ping_and_tcp_and_the_guard_holds() {
    let o = Overlay::builder(UDP, 3)
        .flags(&["--udp-dataplane=ebpf", "--udp-attach=tc"])
        .start()
        .unwrap();
    for (h, a) in o.agents.iter().enumerate() {
        let log = a.log();
        assert!(
            log.contains("attaching with classic TC (clsact + cls_bpf): --udp-attach=tc"),
            "host {h}: {log}"
        );
        let ns = &o.cluster.hosts[h].ns;
        for (dev, dir, program) in [
            ("flannel0", "egress", "flannel_encap"),
            ("flannel0", "ingress", "flannel_overlay_in"),
            ("eth0", "ingress", "flannel_decap"),
        ] {
            let ours = tc::flannels(ns, dev, dir).unwrap();
            let names: Vec<_> = ours.iter().map(|f| f.bpf_name.as_deref()).collect();
            assert_eq!(
                names,
                [Some(program)],
                "host {h}: tc {dir} of {dev}: {ours:?}"
            );
            // Our filter and nothing on TCX.
            let all = tc::attached_programs(ns, dev, dir).unwrap();
            assert_eq!(all, [program], "host {h}: programs on {dev} {dir}");
        }
        let pins = std::fs::read_dir(o.cluster.hosts[h].pin_dir()).unwrap();
        let links: Vec<_> = pins
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            // XDP decap's link is not TCX (auto picks XDP where eth0 has GRO on, as on 5.10's
            // veth).
            .filter(|n| n.ends_with("_link") && !n.contains("_xdp"))
            .collect();
        assert!(links.is_empty(), "host {h}: TCX links pinned: {links:?}");
    }
    o.check_all_pairs(4 << 20).unwrap();
    for h in 0..3 {
        assert_eq!(metric(&o, h, UNVERIFIED), Some(0), "{}", o.agent_log(h));
    }
    assert_guard_holds_on_host0(&o);
}

/// `sent, received` of a finished `ping -q`.
fn ping_counts(out: &std::process::Output) -> (u32, u32) {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// The eBPF mode's flannel0 is a kernel VXLAN device (VNI 1 on the udp port, no learning, no
/// ARP) with carrier; it replaces an ifb flannel0 an older version left, and an agent restart
/// keeps it (same ifindex) with traffic flowing throughout.
#[test]
fn ebpf_flannel0_is_a_vxlan_device_replacing_an_old_ifb_and_kept_across_restarts() {
    let mut o = Overlay::builder(UDP, 2)
        .flags(&["--udp-dataplane=ebpf"])
        .before_agents(|c| {
            c.hosts[0]
                .ns
                .ip(&["link", "add", "flannel0", "type", "ifb"])?;
            Ok(())
        })
        .start()
        .unwrap();
    for h in 0..2 {
        let link = o.cluster.hosts[h]
            .ns
            .ip(&["-d", "link", "show", "flannel0"])
            .unwrap();
        for want in [
            "vxlan id 1 ",
            "dstport 8285 ",
            "nolearning",
            "NOARP",
            "LOWER_UP",
        ] {
            assert!(link.contains(want), "host {h}: no {want:?} in {link}");
        }
    }
    let log = o.agent_log(0);
    assert!(
        log.contains("flannel0 is a ifb device: replacing it with a vxlan"),
        "{log}"
    );
    let (ifindex, _) = flannel0(&o, 0);

    // 15 s of pings at 100/s through the restart.
    let dst = o.containers[1].ip;
    let mut ping = o.containers[0]
        .ping_command(dst, 1500, &["-W", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(5), "pings flowing", || {
        (metric(&o, 0, "flannel_dataplane_packets_total{direction=\"rx\"}")? >= 20).then_some(())
    })
    .unwrap();
    o.start_agent(0).unwrap();
    assert!(
        ping.try_wait().unwrap().is_none(),
        "the restart must happen while pinging"
    );
    let (sent, received) = ping_counts(&ping.wait_with_output().unwrap());
    assert_eq!((sent, received), (1500, 1500), "{}", o.agent_log(0));
    assert_eq!(
        flannel0(&o, 0).0,
        ifindex,
        "flannel0 kept across the restart"
    );
    assert!(o.containers[1].ping(o.containers[0].ip, 3, 2).unwrap());
    // flannel0's guard is still in place.
    assert_guard_holds_on_host0(&o);
}

/// Starts an agent with `dataplane` on a host where another program already holds UDP 8285
/// on the wildcard address; returns once the agent has exited, or became ready.
fn agent_with_the_port_taken(dataplane: &str) -> (Cluster, Agent, std::net::UdpSocket) {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(UDP).unwrap();
    let squatter = cluster.hosts[0]
        .ns
        .enter(|| std::net::UdpSocket::bind("0.0.0.0:8285").unwrap());
    let mut agent = cluster
        .start_agent(0, &[&format!("--udp-dataplane={dataplane}")])
        .unwrap();
    let _ = agent.wait_ready(Duration::from_secs(20));
    (cluster, agent, squatter)
}

/// Exits (the data plane cannot receive) with the reason in the agent's last log line, and
/// leaves no flannel0 behind.
fn assert_exits_because_the_port_is_taken(cluster: &Cluster, agent: &mut Agent) {
    let status = agent.wait_exit(Duration::from_secs(5)).unwrap();
    let log = agent.own_log();
    assert!(!status.success(), "{status}\n{log}");
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("ERROR")
            && last.contains("flannel0: UDP port 8285 is in use by another program"),
        "last line: {last}\n{log}"
    );
    let links = cluster.hosts[0].ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("flannel0"), "{links}");
}

#[test]
fn ebpf_mode_exits_with_a_clear_error_when_the_udp_port_is_taken() {
    let (cluster, mut agent, _squatter) = agent_with_the_port_taken("ebpf");
    assert_exits_because_the_port_is_taken(&cluster, &mut agent);
}

/// The TUN data plane needs the same port: auto does not fall back to it.
#[test]
fn auto_mode_exits_with_the_same_error_when_the_udp_port_is_taken() {
    let (cluster, mut agent, _squatter) = agent_with_the_port_taken("auto");
    assert_exits_because_the_port_is_taken(&cluster, &mut agent);
    assert!(
        !agent
            .own_log()
            .contains("falling back to the TUN data plane"),
        "{}",
        agent.own_log()
    );
}

/// An upgrade from a version whose eBPF mode used an ifb flannel0: that agent's programs stay
/// pinned (links to flannel0 and eth0) when the new agent replaces the ifb, whose deletion
/// leaves the flannel0 links attached to nothing. The new agent must attach afresh.
#[test]
fn upgrading_from_an_ifb_flannel0_with_pinned_programs_keeps_the_overlay_working() {
    let mut o = Overlay::builder(UDP, 2)
        .flags(&["--udp-dataplane=ebpf"])
        .start()
        .unwrap();
    o.agents[0].stop().unwrap();
    // The old version's device, with the pins of a previous run still in place.
    let ns = &o.cluster.hosts[0].ns;
    ns.ip(&["link", "del", "flannel0"]).unwrap();
    ns.ip(&["link", "add", "flannel0", "type", "ifb"]).unwrap();
    ns.ip(&["link", "set", "flannel0", "arp", "off", "up"])
        .unwrap();
    o.start_agent(0).unwrap();
    let link = o.cluster.hosts[0]
        .ns
        .ip(&["-d", "link", "show", "flannel0"])
        .unwrap();
    assert!(link.contains("vxlan id 1 "), "{link}");
    o.check_all_pairs(1 << 20)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", o.agent_log(0)));
    // flannel0's guard came with the new device.
    assert_guard_holds_on_host0(&o);
}
