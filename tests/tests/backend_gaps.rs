//! Backend behaviour an operator relies on: vxlan DirectRouting (peers on our L2 network get a
//! plain route via their public IP, the others the vxlan route; stale direct routes go), for
//! IPv4 and for the IPv6 side of a dual-stack network, GBP, and host-gw with a peer that is not
//! on our link (one clear error, not one per resync).

use std::time::{Duration, Instant};

use flannel_tests::dual_stack::{self, ipv6_behind_router, ipv6_underlay, DualPod};
use flannel_tests::{wait_for, Cluster, Overlay};

const BYTES: usize = 256 << 10;
const ROUTER: &str = "198.51.100.1";
/// Longer than one backend resync (10 s), so that a repeat would have shown.
const PAST_A_RESYNC: Duration = Duration::from_secs(12);
/// A backend resync (every 10 s) has run within this.
const RESYNC_DEADLINE: Duration = Duration::from_secs(25);

/// Host `i` also gets an address on 198.51.100.0/24, which the other hosts reach only through
/// the switch acting as a router: a host on another L2 network as far as they can tell.
fn behind_router(i: usize) -> impl FnOnce(&Cluster) -> flannel_tests::Result<()> {
    move |c: &Cluster| {
        c.switch
            .ip(&["addr", "add", &format!("{ROUTER}/24"), "dev", "br0"])?;
        c.switch.sysctl("net.ipv4.ip_forward", "1")?;
        c.hosts[i].ns.ip(&[
            "addr",
            "add",
            &format!("198.51.100.{}/24", 10 + i),
            "dev",
            "eth0",
        ])?;
        Ok(())
    }
}

fn route_to(o: &Overlay, on: usize, subnet: &str) -> String {
    o.cluster.hosts[on]
        .ns
        .ip(&["-4", "route", "show", subnet])
        .unwrap_or_default()
        .trim()
        // How the kernel lists who installed it is not the point here.
        .replace(" proto static", "")
}

#[test]
fn vxlan_direct_routing_routes_l2_peers_directly_and_others_over_vxlan() {
    let mut o = Overlay::builder(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","DirectRouting":true}}"#,
        3,
    )
    .host_flags(2, &["--iface=198.51.100.12"])
    .before_agents(behind_router(2))
    .start()
    .unwrap();
    let s1 = o.agents[1].subnet().unwrap();
    let s2 = o.agents[2].subnet().unwrap();
    assert_eq!(
        route_to(&o, 0, &s1),
        format!("{s1} via 192.0.2.11 dev eth0")
    );
    let net2: ipnetwork::Ipv4Network = s2.parse().unwrap();
    assert_eq!(
        route_to(&o, 0, &s2),
        format!("{s2} via {} dev flannel.1 onlink", net2.network())
    );
    o.check_all_pairs(BYTES).unwrap();

    // A direct route left by an earlier run for a peer that is gone is removed.
    o.agents[0].stop().unwrap();
    o.cluster.hosts[0]
        .add_route_via_eth0("10.244.250.0/24", "192.0.2.11")
        .unwrap();
    o.start_agent(0).unwrap();
    wait_until_host0_has_no_route(
        &o,
        Duration::from_secs(15),
        "stale direct route removed",
        "10.244.250.0/24",
    );
    assert_eq!(
        route_to(&o, 0, &s1),
        format!("{s1} via 192.0.2.11 dev eth0")
    );

    // A peer whose lease goes takes its direct route with it.
    o.agents[1].stop().unwrap();
    o.cluster
        .etcd
        .del(&format!(
            "/coreos.com/network/subnets/{}",
            s1.replace('/', "-")
        ))
        .unwrap();
    wait_until_host0_has_no_route(
        &o,
        Duration::from_secs(10),
        "direct route of a removed peer",
        &s1,
    );
}

/// Waits up to `within` until host 0 has no route to `dst` (IPv4 or IPv6), else fails with
/// agent 0's log.
fn wait_until_host0_has_no_route(o: &Overlay, within: Duration, what: &str, dst: &str) {
    let route = if dst.contains(':') {
        route6_to
    } else {
        route_to
    };
    wait_for(within, what, || route(o, 0, dst).is_empty().then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", o.agent_log(0)));
}

/// `ip -6 route show <subnet>` on host `on`, without what the kernel adds to every route.
fn route6_to(o: &Overlay, on: usize, subnet: &str) -> String {
    let out = o.cluster.hosts[on]
        .ns
        .ip(&["-6", "route", "show", subnet])
        .unwrap_or_default();
    let mut r = out.trim().to_owned();
    for noise in [" proto static", " metric 1024", " pref medium"] {
        r = r.replace(noise, "");
    }
    r
}

/// Polls until host `on` routes `subnet` as `want` (empty: no route), then compares.
fn assert_route6(o: &Overlay, on: usize, subnet: &str, want: &str) {
    let _ = wait_for(Duration::from_secs(10), "the IPv6 route", || {
        (route6_to(o, on, subnet) == want).then_some(())
    });
    assert_eq!(
        route6_to(o, on, subnet),
        want,
        "host {on}, IPv6 route to {subnet}\n{}",
        o.agent_log(on)
    );
}

const DUAL_DIRECT: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"vxlan","DirectRouting":true}}"#;
const V6_NET: &str = "fd00:10:244::/48";

#[test]
fn vxlan_direct_routing_ipv6_routes_l2_peers_directly_and_others_over_vxlan_v6() {
    // Hosts 0 and 1 share 192.0.2.0/24 and 2001:db8::/64; host 2 publishes addresses on
    // 198.51.100.0/24 and 2001:db8:1::/64, which they reach only through a router.
    let mut o = Overlay::builder(DUAL_DIRECT, 3)
        .host_flags(
            2,
            &[
                "--iface=198.51.100.12",
                &format!("--public-ipv6={}12", dual_stack::ROUTED_V6_PREFIX),
            ],
        )
        .before_agents(ipv6_underlay)
        .before_agents(behind_router(2))
        .before_agents(ipv6_behind_router(2))
        .containers_per_host(0)
        .start()
        .unwrap();
    let s4: Vec<String> = o.agents.iter().map(|a| a.subnet().unwrap()).collect();
    let s6: Vec<String> = o.agents.iter().map(|a| a.ipv6_subnet().unwrap()).collect();
    let via_vxlan6 = |s: &str| {
        format!(
            "{s} via {} dev flannel-v6.1 onlink",
            s.split('/').next().unwrap()
        )
    };

    // Hosts 0 and 1 route each other directly and host 2 over vxlan; host 2 has both of them on
    // its L2 network (it keeps 192.0.2.12 and 2001:db8::12) and routes them directly.
    for (on, peer) in [(0, 1), (1, 0), (2, 0), (2, 1)] {
        assert_route6(
            &o,
            on,
            &s6[peer],
            &format!("{} via 2001:db8::{} dev eth0", s6[peer], 10 + peer),
        );
        assert_eq!(
            route_to(&o, on, &s4[peer]),
            format!("{} via 192.0.2.{} dev eth0", s4[peer], 10 + peer)
        );
    }
    for on in [0, 1] {
        assert_route6(&o, on, &s6[2], &via_vxlan6(&s6[2]));
        let net2: ipnetwork::Ipv4Network = s4[2].parse().unwrap();
        assert_eq!(
            route_to(&o, on, &s4[2]),
            format!("{} via {} dev flannel.1 onlink", s4[2], net2.network())
        );
    }
    let pods = DualPod::one_per_host(&o, V6_NET).unwrap();
    dual_stack::check_all_pairs(&pods, BYTES)
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", o.agent_log(0), o.agent_log(2)));

    // A direct IPv6 route into the Network left by an earlier run for a peer that is gone is
    // removed; a route outside the Network on the same interface stays.
    o.agents[0].stop().unwrap();
    let (stale, foreign) = ("fd00:10:244:ff::/64", "2001:db8:99::/64");
    for dst in [stale, foreign] {
        o.cluster.hosts[0]
            .add_route_via_eth0(dst, "2001:db8::11")
            .unwrap();
    }
    o.start_agent(0).unwrap();
    wait_until_host0_has_no_route(
        &o,
        Duration::from_secs(15),
        "stale direct IPv6 route removed",
        stale,
    );
    assert_eq!(
        route6_to(&o, 0, foreign),
        format!("{foreign} via 2001:db8::11 dev eth0")
    );
    assert_route6(
        &o,
        0,
        &s6[1],
        &format!("{} via 2001:db8::11 dev eth0", s6[1]),
    );
    assert_route6(&o, 0, &s6[2], &via_vxlan6(&s6[2]));
    for dst in [pods[1].v6, pods[2].v6] {
        wait_for(
            Duration::from_secs(10),
            "IPv6 ping after the restart",
            || pods[0].ping(dst).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}: -> {dst}\n{}", o.agent_log(0)));
    }

    // One added while the agent runs goes with the next periodic resync.
    let stale = "fd00:10:244:fe::/64";
    o.cluster.hosts[0]
        .add_route_via_eth0(stale, "2001:db8::11")
        .unwrap();
    wait_until_host0_has_no_route(
        &o,
        RESYNC_DEADLINE,
        "stale direct IPv6 route removed",
        stale,
    );
    assert!(
        o.agent_log(0).contains(&format!(
            "removing stale direct IPv6 route {stale} via 2001:db8::11"
        )),
        "{}",
        o.agent_log(0)
    );

    // A peer whose lease goes takes its direct IPv6 route with it.
    o.agents[1].stop().unwrap();
    let key = o
        .cluster
        .leases()
        .unwrap()
        .into_iter()
        .find(|kv| kv.key.contains(&format!("/{}&", s4[1].replace('/', "-"))))
        .unwrap_or_else(|| panic!("no dual-stack lease for {}", s4[1]))
        .key;
    o.cluster.etcd.del(&key).unwrap();
    assert_route6(&o, 0, &s6[1], "");
    assert!(pods[0].ping(pods[2].v6), "host 2 still reachable over IPv6");
}

#[test]
fn vxlan_gbp_carries_pod_traffic() {
    let o = Overlay::builder(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","GBP":true}}"#,
        2,
    )
    .start()
    .unwrap();
    for h in &o.cluster.hosts {
        let link = h.ns.ip(&["-d", "link", "show", "flannel.1"]).unwrap();
        assert!(link.contains(" gbp"), "{link}");
    }
    o.check_all_pairs(BYTES).unwrap();
}

#[test]
fn host_gw_peer_off_our_link_is_one_error_and_the_others_work() {
    let o = Overlay::builder(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        3,
    )
    .host_flags(2, &["--iface=198.51.100.12"])
    .before_agents(behind_router(2))
    .containers_per_host(0)
    .start()
    .unwrap();
    let s2 = o.agents[2].subnet().unwrap();
    let s1 = o.agents[1].subnet().unwrap();
    let want = format!(
        "host-gw: peer {s2} at 198.51.100.12 is not on our link (eth0): no route to it; host-gw needs all hosts on one L2 network (vxlan with DirectRouting handles mixed networks)"
    );
    let errors = || -> Vec<String> {
        o.agents[0]
            .own_log()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(|l| l.split_once("] ").map_or(l, |(_, m)| m).to_owned())
            .collect()
    };
    let start = Instant::now();
    // Watch through a resync: the error stays one line.
    let _ = wait_for(PAST_A_RESYNC, "a repeated error", || {
        let e = errors();
        assert!(e.len() <= 1, "{e:#?}");
        (start.elapsed() >= PAST_A_RESYNC - Duration::from_millis(500)).then_some(())
    });
    assert_eq!(errors(), vec![want], "{}", o.agent_log(0));
    assert!(
        !o.agents[0].own_log().contains(" WARN "),
        "{}",
        o.agent_log(0)
    );
    assert_eq!(route_to(&o, 0, &s2), "");
    assert_eq!(
        route_to(&o, 0, &s1),
        format!("{s1} via 192.0.2.11 dev eth0")
    );
}

fn masq_rules_naming(o: &Overlay, subnet: &str) -> Vec<String> {
    o.cluster.hosts[0]
        .ns
        .exec("iptables-save", &[])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("-A FLANNEL-POSTRTG") && l.contains(subnet))
        .map(str::to_owned)
        .collect()
}

#[test]
fn masquerade_rules_follow_our_subnet_when_it_changes() {
    let mut o = Overlay::builder(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
        1,
    )
    .flags(&["--ip-masq", "--iptables-resync=1"])
    .containers_per_host(0)
    .start()
    .unwrap();
    let old = o.agents[0].subnet().unwrap();
    assert_eq!(masq_rules_naming(&o, &old).len(), 1, "{}", o.agent_log(0));

    // Another node now holds our subnet in etcd: the agent gives it up (exits, as upstream)...
    let key = format!(
        "{}/subnets/{}",
        flannel_tests::cluster::DEFAULT_PREFIX,
        old.replace('/', "-")
    );
    o.cluster
        .etcd
        .put(&key, r#"{"PublicIP":"192.0.2.77","PublicIPv6":null}"#)
        .unwrap();
    let st = o.agents[0].wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!st.success(), "{}", o.agent_log(0));

    // ...and started again it gets another subnet, whose rules replace the old ones.
    o.start_agent(0).unwrap();
    let new = o.agents[0].subnet().unwrap();
    assert_ne!(new, old);
    assert_eq!(masq_rules_naming(&o, &new).len(), 1, "{}", o.agent_log(0));
    assert!(
        masq_rules_naming(&o, &old).is_empty(),
        "rules for the subnet we gave up are left: {:?}",
        masq_rules_naming(&o, &old)
    );
}
