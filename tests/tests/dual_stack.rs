//! Dual stack with host-gw on three hosts: leases, lease JSON and subnet.env as upstream writes
//! them, pods attached with an IPv4 and an IPv6 range (as flannel's CNI plugin renders them)
//! reach each other over both families, and IPv6 routes follow etcd removals; the same for an
//! IPv6-only host-gw network (EnableIPv4 false), whose IPv4 side stays off.

use std::time::Duration;

use flannel_tests::dual_stack::{
    check_all_pairs, dual_stack_lease, on_ipv6_underlay, DualPod as Pod, V6Pod, V6SubnetEnv,
};
use flannel_tests::traffic::tcp_send_ip;
use flannel_tests::{wait_for, Cluster, Overlay};

const DUAL_HOSTGW: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"host-gw"}}"#;
const V6_NET: &str = "fd00:10:244::/48";
const V6_ONLY_HOSTGW: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"host-gw"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";

/// Waits until a resync removed host 0's IPv6 route to `stale`, one that no peer owns.
fn wait_until_the_resync_removes(o: &Overlay, stale: &str) {
    let h0 = &o.cluster.hosts[0];
    wait_for(Duration::from_secs(25), "stale IPv6 route removed", || {
        h0.ns
            .ip(&["-6", "route", "show", stale])
            .ok()?
            .trim()
            .is_empty()
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", o.agent_log(0)));
}

#[test]
fn ipv6_only_host_gw_three_hosts_pods_talk_v6_routes_follow_etcd_and_ipv4_is_left_alone() {
    let mut o = on_ipv6_underlay(V6_ONLY_HOSTGW, 3).unwrap();

    let leases = o.cluster.leases().unwrap();
    assert_eq!(leases.len(), 3, "{leases:?}");
    let mut envs = Vec::new();
    for (i, a) in o.agents.iter().enumerate() {
        let env = V6SubnetEnv::read(&a.subnet_file).unwrap();
        let key = format!("{SUBNETS}0.0.0.0-0&{}", env.subnet.replace('/', "-"));
        let lease = leases.iter().find(|kv| kv.key == key).unwrap();
        assert_eq!(
            lease.value,
            format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::{}","BackendType":"host-gw"}}"#,
                10 + i
            )
        );
        assert_eq!(env.mtu, 1500);
        assert!(!std::fs::read_to_string(&a.subnet_file)
            .unwrap()
            .contains("FLANNEL_NETWORK"));
        envs.push(env);
    }
    for h in 0..3 {
        for p in (0..3).filter(|p| *p != h) {
            let want = format!("{} via 2001:db8::{} dev eth0", envs[p].subnet, 10 + p);
            wait_for(Duration::from_secs(10), "IPv6 route", || {
                o.cluster.hosts[h]
                    .ns
                    .ip(&["-6", "route", "show", &envs[p].subnet])
                    .ok()?
                    .contains(&want)
                    .then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}: host {h}: {want}\n{}", o.agent_log(h)));
        }
    }

    let pods: Vec<V6Pod> = (0..3)
        .map(|i| V6Pod::attach(&o.cluster.hosts[i], &envs[i]).unwrap())
        .collect();
    for a in &pods {
        for b in pods.iter().filter(|b| b.v6 != a.v6) {
            wait_for(Duration::from_secs(10), "pod ping", || {
                a.ping(b.v6).then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}: {} -> {}", a.v6, b.v6));
            let t = tcp_send_ip(&a.ns, &b.ns, b.v6, 256 << 10).unwrap();
            assert_eq!((t.bytes, t.client), (256 << 10, a.v6));
        }
    }

    // A resync (seen removing a stale IPv6 route) leaves IPv4 gateway routes alone: there is
    // no IPv4 Network whose routes would be flannel's.
    let h0 = &o.cluster.hosts[0];
    let v4_route = "10.99.0.0/24";
    h0.add_route_via_eth0(v4_route, "192.0.2.11").unwrap();
    let stale = "fd00:10:244:ff::/64";
    h0.add_route_via_eth0(stale, "2001:db8::99").unwrap();
    wait_until_the_resync_removes(&o, stale);
    assert!(h0
        .ns
        .ip(&["route", "show", v4_route])
        .unwrap()
        .contains("via 192.0.2.11"));
    let v4_rules = h0.ns.exec("iptables-save", &[]).unwrap();
    assert!(!v4_rules.contains("FLANNEL"), "{v4_rules}");

    // Host 2's lease deleted: its route goes on the others.
    o.agents[2].stop().unwrap();
    let key = format!("{SUBNETS}0.0.0.0-0&{}", envs[2].subnet.replace('/', "-"));
    o.cluster.etcd.del(&key).unwrap();
    for h in 0..2 {
        wait_for(
            Duration::from_secs(10),
            "the removed peer's route gone",
            || {
                o.cluster.hosts[h]
                    .ns
                    .ip(&["-6", "route", "show", &envs[2].subnet])
                    .ok()?
                    .trim()
                    .is_empty()
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}: host {h}\n{}", o.agent_log(h)));
    }
    assert!(pods[0].ping(pods[1].v6));
}

#[test]
fn dual_stack_host_gw_three_hosts_v4_and_v6_pods_talk_and_v6_routes_follow_etcd() {
    let mut o = on_ipv6_underlay(DUAL_HOSTGW, 3).unwrap();

    // Leases: upstream's key form and JSON, byte for byte.
    let leases = o.cluster.leases().unwrap();
    assert_eq!(leases.len(), 3);
    let mut v6_subnets = Vec::new();
    for (i, a) in o.agents.iter().enumerate() {
        let v4 = a.subnet().unwrap();
        let (lease, v6_ip) = dual_stack_lease(&leases, &v4);
        assert!(v6_ip.starts_with("fd00:10:244:"), "{}", lease.key);
        assert_eq!(
            lease.value,
            format!(
                r#"{{"PublicIP":"192.0.2.{}","PublicIPv6":"2001:db8::{}","BackendType":"host-gw"}}"#,
                10 + i,
                10 + i
            )
        );
        let v6_subnet = format!("{v6_ip}/64");
        let first6: std::net::Ipv6Addr = v6_ip.parse().unwrap();
        let first6 = std::net::Ipv6Addr::from(u128::from(first6) + 1);
        let v4net: ipnetwork::Ipv4Network = v4.parse().unwrap();
        let first4 = std::net::Ipv4Addr::from(u32::from(v4net.network()) + 1);
        assert_eq!(
            std::fs::read_to_string(&a.subnet_file).unwrap(),
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={first4}/24\nFLANNEL_IPV6_NETWORK={V6_NET}\nFLANNEL_IPV6_SUBNET={first6}/64\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
            )
        );
        v6_subnets.push(v6_subnet);
    }

    // ip6tables: upstream's forward and masquerade rules for the IPv6 network and subnet.
    let saved = o.cluster.hosts[0].ns.exec("ip6tables-save", &[]).unwrap();
    let s6 = &v6_subnets[0];
    for line in [
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD".to_owned(),
        format!("-A FLANNEL-FWD -s {V6_NET} -m comment --comment \"flanneld forward\" -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {V6_NET} -m comment --comment \"flanneld forward\" -j ACCEPT"),
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG".to_owned(),
        format!("-A FLANNEL-POSTRTG -s {s6} -d {V6_NET} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {V6_NET} -d {s6} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {V6_NET} -d {s6} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {V6_NET} ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
        format!("-A FLANNEL-POSTRTG ! -s {V6_NET} -d {V6_NET} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
    ] {
        assert!(saved.contains(&line), "missing {line:?} in\n{saved}");
    }

    // IPv6 routes to the peers via their PublicIPv6.
    let h0 = &o.cluster.hosts[0];
    for (i, s) in v6_subnets.iter().enumerate().skip(1) {
        let want = format!("{s} via 2001:db8::{} dev eth0", 10 + i);
        wait_for(Duration::from_secs(10), "IPv6 route", || {
            h0.ns
                .ip(&["-6", "route", "show", s])
                .ok()?
                .contains(&want)
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {want}\n{}", o.agent_log(0)));
    }

    // A route into the IPv6 network that no peer owns (e.g. left by a previous run to a host
    // that is gone) is removed by the resync; routes outside the network stay.
    let (stale, foreign) = ("fd00:10:244:ff::/64", "2001:db8:99::/64");
    for dst in [stale, foreign] {
        h0.add_route_via_eth0(dst, "2001:db8::99").unwrap();
    }
    wait_until_the_resync_removes(&o, stale);
    assert!(o.agent_log(0).contains(&format!(
        "removing stale IPv6 route {stale} via 2001:db8::99"
    )));
    assert!(!h0
        .ns
        .ip(&["-6", "route", "show", foreign])
        .unwrap()
        .is_empty());

    let pods = Pod::one_per_host(&o, V6_NET).unwrap();
    check_all_pairs(&pods, 128 << 10).unwrap_or_else(|e| panic!("{e:#}\n{}", o.agent_log(0)));

    // Host 2 leaves (its lease deleted from etcd): its IPv6 route goes on host 0.
    o.agents[2].stop().unwrap();
    let key = leases
        .iter()
        .find(|kv| kv.key.contains(&v6_subnets[2].replace("/64", "-64")))
        .unwrap()
        .key
        .clone();
    o.cluster.etcd.del(&key).unwrap();
    wait_for(
        Duration::from_secs(10),
        "IPv6 route of a removed peer",
        || {
            h0.ns
                .ip(&["-6", "route", "show", &v6_subnets[2]])
                .ok()?
                .trim()
                .is_empty()
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", o.agent_log(0)));
    assert!(Pod::ping(&pods[0], pods[1].v6));

    // uninstall removes the ip6tables chains too.
    let out = o.uninstall(0).unwrap();
    let h0 = &o.cluster.hosts[0];
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("ip6tables chain FLANNEL-POSTRTG (table nat) removed"),
        "{err}"
    );
    let saved = h0.ns.exec("ip6tables-save", &[]).unwrap();
    assert!(!saved.contains("FLANNEL"), "{saved}");
}

#[test]
fn ipv6_with_udp_is_refused_naming_the_backend() {
    let cluster = Cluster::new(1).unwrap();
    cluster
        .set_config(r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"udp"}}"#)
        .unwrap();
    let agent = cluster.start_agent(0, &[]).unwrap();
    let line = wait_for(Duration::from_secs(20), "the refusal", || {
        agent
            .own_log()
            .lines()
            .find(|l| l.contains(" ERROR ") && l.contains("EnableIPv6"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(
        line.contains(
            "the udp backend carries IPv4 only (as upstream's): use vxlan or host-gw for IPv6"
        ),
        "{line}"
    );
    assert_eq!(agent.http_get("/readyz").map(|(s, _)| s).unwrap_or(0), 503);
}

#[test]
fn a_restart_asks_for_both_subnets_of_the_previous_run_again() {
    let config = DUAL_HOSTGW.replace("host-gw", "alloc");
    let mut o = on_ipv6_underlay(&config, 1).unwrap();
    let v4 = o.agents[0].subnet_env_value("FLANNEL_SUBNET").unwrap();
    let v6 = o.agents[0].subnet_env_value("FLANNEL_IPV6_SUBNET").unwrap();
    // Stopped, and its lease gone from etcd (expired, or deleted by an operator): a fresh start
    // takes the subnets recorded in subnet.env again while they are free, as upstream does.
    o.agents[0].stop().unwrap();
    for kv in o.cluster.leases().unwrap() {
        o.cluster.etcd.del(&kv.key).unwrap();
    }
    o.start_agent(0).unwrap();
    assert_eq!(
        o.agents[0].subnet_env_value("FLANNEL_SUBNET").unwrap(),
        v4,
        "{}",
        o.agent_log(0)
    );
    assert_eq!(
        o.agents[0].subnet_env_value("FLANNEL_IPV6_SUBNET").unwrap(),
        v6,
        "{}",
        o.agent_log(0)
    );
    let leases = o.cluster.leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert!(leases[0].key.ends_with(&format!(
        "{}&{}",
        v4.replace(".1/24", ".0-24"),
        v6.replace("::1/64", "::-64")
    )));
}
