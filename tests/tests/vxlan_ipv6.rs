//! The vxlan backend with IPv6: a second device `flannel-v6.<VNI>` over the IPv6 underlay, its
//! VTEP MAC published as BackendV6Data byte for byte as upstream writes it, per-peer IPv6
//! neighbour, FDB entry and onlink route that follow etcd and survive a deleted device, and
//! CNI-attached dual-stack pods that reach each other over both families; the same for an
//! IPv6-only network (EnableIPv4 false).

use std::time::Duration;

use flannel_tests::dual_stack::{
    check_all_pairs, dual_stack_lease, ipv6_underlay, on_ipv6_underlay, DualPod as Pod, V6Pod,
    V6SubnetEnv,
};
use flannel_tests::traffic::tcp_send_ip;
use flannel_tests::{wait_for, Cluster, Netns, Overlay};

const DUAL_VXLAN: &str = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"vxlan"}}"#;
const V6_ONLY_VXLAN: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"vxlan"}}"#;
const V6_NET: &str = "fd00:10:244::/48";
const V6_DEV: &str = "flannel-v6.1";
const SUBNETS: &str = "/coreos.com/network/subnets/";
/// The agents re-check devices and entries every 10 s.
const RESYNC: Duration = Duration::from_secs(25);
/// Peer changes are applied as etcd reports them.
const FOLLOW: Duration = Duration::from_secs(10);

fn device_mac(ns: &Netns, dev: &str) -> String {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["address"].as_str().unwrap().to_owned()
}

/// The network address of an IPv6 subnet `a:b:c:d::/64` (the peer's v6 VTEP address).
fn v6_vtep(subnet: &str) -> String {
    subnet.split('/').next().unwrap().to_owned()
}

/// What host `ns` has on flannel-v6.1 for a peer: (neighbour, FDB entry, onlink route).
fn v6_entries(ns: &Netns, subnet: &str, mac: &str, public_ipv6: &str) -> (bool, bool, bool) {
    let vtep = v6_vtep(subnet);
    let neigh = ns
        .ip(&["-6", "neigh", "show", "dev", V6_DEV])
        .unwrap_or_default();
    let fdb = ns
        .exec("bridge", &["fdb", "show", "dev", V6_DEV])
        .unwrap_or_default();
    let routes = ns.ip(&["-6", "route", "show", subnet]).unwrap_or_default();
    (
        neigh.lines().any(|l| {
            l.starts_with(&format!("{vtep} ")) && l.contains(mac) && l.contains("PERMANENT")
        }),
        fdb.lines().any(|l| {
            l.starts_with(mac)
                && l.contains(&format!("dst {public_ipv6} "))
                && l.contains("self")
                && l.contains("permanent")
        }),
        routes.lines().any(|l| {
            l.starts_with(&format!("{subnet} via {vtep} dev {V6_DEV}")) && l.contains("onlink")
        }),
    )
}

#[test]
fn dual_stack_vxlan_three_hosts_pods_talk_over_both_families_and_v6_entries_follow_etcd() {
    let mut o = on_ipv6_underlay(DUAL_VXLAN, 3).unwrap();

    // Leases: upstream's dual-stack key and JSON (BackendV6Data after BackendData), devices.
    let leases = o.cluster.leases().unwrap();
    assert_eq!(leases.len(), 3);
    let mut v6_subnets = Vec::new();
    let mut v6_macs = Vec::new();
    for (i, a) in o.agents.iter().enumerate() {
        let host = &o.cluster.hosts[i];
        let v4 = a.subnet().unwrap();
        let (lease, v6_ip) = dual_stack_lease(&leases, &v4);
        let mac4 = device_mac(&host.ns, "flannel.1");
        let mac6 = device_mac(&host.ns, V6_DEV);
        assert_ne!(mac4, mac6);
        assert_eq!(
            lease.value,
            format!(
                r#"{{"PublicIP":"192.0.2.{n}","PublicIPv6":"2001:db8::{n}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac4}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#,
                n = 10 + i
            )
        );
        let link = host.ns.ip(&["-d", "link", "show", "dev", V6_DEV]).unwrap();
        for want in [
            "mtu 1430",
            "vxlan id 1",
            &format!("local 2001:db8::{}", 10 + i),
            "dev eth0",
            "nolearning",
        ] {
            assert!(link.contains(want), "{want:?} missing in {link}");
        }
        let addr = host.ns.ip(&["-6", "addr", "show", "dev", V6_DEV]).unwrap();
        assert!(addr.contains(&format!("inet6 {v6_ip}/128")), "{addr}");
        // One MTU for the pods of both families: the IPv6 device's (20 bytes more outer header).
        assert_eq!(a.subnet_env_value("FLANNEL_MTU").as_deref(), Some("1430"));
        assert_eq!(
            a.subnet_env_value("FLANNEL_IPV6_NETWORK").as_deref(),
            Some(V6_NET)
        );
        v6_subnets.push(format!("{v6_ip}/64"));
        v6_macs.push(mac6);
    }

    // Every host has every peer's IPv6 neighbour, FDB entry and onlink route.
    for h in 0..3 {
        for p in (0..3).filter(|p| *p != h) {
            let pub6 = format!("2001:db8::{}", 10 + p);
            wait_for(FOLLOW, "IPv6 peer entries", || {
                let e = v6_entries(&o.cluster.hosts[h].ns, &v6_subnets[p], &v6_macs[p], &pub6);
                (e == (true, true, true)).then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}: host {h} peer {p}\n{}", o.agent_log(h)));
        }
    }

    let pods = Pod::one_per_host(&o, V6_NET).unwrap();
    check_all_pairs(&pods, 256 << 10).unwrap_or_else(|e| panic!("{e:#}\n{}", o.agent_log(0)));

    // flannel-v6.1 deleted by hand: the resync brings it back with its MAC and peer entries.
    let h0 = &o.cluster.hosts[0];
    h0.ns.ip(&["link", "del", V6_DEV]).unwrap();
    wait_for(
        RESYNC,
        "flannel-v6.1 recreated and IPv6 pod traffic flowing",
        || Pod::ping(&pods[0], pods[1].v6).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", o.agent_log(0)));
    assert_eq!(device_mac(&h0.ns, V6_DEV), v6_macs[0]);
    assert!(Pod::ping(&pods[0], pods[2].v6));
    assert!(Pod::ping(&pods[0], pods[1].v4), "IPv4 unaffected");

    // A v4-only vxlan peer (an upstream node without IPv6) in the dual-stack cluster: it gets
    // its IPv4 entries, nothing on the IPv6 device, and the IPv6 side keeps working.
    let v4_only_key = format!("{SUBNETS}10.244.250.0-24");
    o.cluster
        .etcd
        .put(
            &v4_only_key,
            r#"{"PublicIP":"192.0.2.99","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:f1:c0:00:02:63"}}"#,
        )
        .unwrap();
    wait_for(FOLLOW, "the v4-only peer's route on flannel.1", || {
        h0.ns
            .ip(&["route", "show", "10.244.250.0/24"])
            .ok()?
            .contains("via 10.244.250.0 dev flannel.1")
            .then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            h0.ns.ip(&["route"]).unwrap_or_default(),
            o.agent_log(0)
        )
    });
    let fdb6 = h0
        .ns
        .exec("bridge", &["fdb", "show", "dev", V6_DEV])
        .unwrap();
    assert!(!fdb6.contains("0e:f1:c0:00:02:63"), "{fdb6}");
    assert!(Pod::ping(&pods[0], pods[1].v6));

    // Host 2 leaves (lease deleted in etcd): its IPv6 entries go on the others.
    o.agents[2].stop().unwrap();
    let key = leases
        .iter()
        .find(|kv| kv.key.contains(&v6_subnets[2].replace("/64", "-64")))
        .unwrap()
        .key
        .clone();
    o.cluster.etcd.del(&key).unwrap();
    for h in 0..2 {
        wait_for(FOLLOW, "a removed peer's IPv6 entries gone", || {
            let e = v6_entries(
                &o.cluster.hosts[h].ns,
                &v6_subnets[2],
                &v6_macs[2],
                "2001:db8::12",
            );
            (e == (false, false, false)).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: host {h}\n{}", o.agent_log(h)));
    }
    assert!(Pod::ping(&pods[0], pods[1].v6));
    assert!(Pod::ping(&pods[1], pods[0].v4));

    // uninstall removes both vxlan devices.
    let out = o.uninstall(0).unwrap();
    let h0 = &o.cluster.hosts[0];
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for dev in ["flannel.1", V6_DEV] {
        assert!(err.contains(&format!("device {dev} removed")), "{err}");
        assert!(
            h0.ns.ip(&["link", "show", "dev", dev]).is_err(),
            "{dev} still there"
        );
    }
}

/// IPv6-only (EnableIPv4 false) with vxlan, each agent picking its interface by IPv6
/// (`--iface`, `--iface-regex`, `--iface-can-reach`): upstream's keys `0.0.0.0-0&<v6>-64`, lease JSON with
/// PublicIP 0.0.0.0 and BackendV6Data alone, subnet.env without the IPv4 lines, only
/// `flannel-v6.1`, only IPv6 rules, pods that talk over IPv6, entries that follow etcd, and a
/// restarted node finding its own lease by PublicIPv6 (upstream's would take the first 0.0.0.0
/// one).
#[test]
fn ipv6_only_vxlan_three_hosts_upstream_leases_and_subnet_env_pods_talk_and_entries_follow_etcd() {
    let mut b = Overlay::builder(V6_ONLY_VXLAN, 3)
        .containers_per_host(0)
        .flags(&["--ip-blackhole-route"])
        .before_agents(ipv6_underlay);
    // The three ways of naming the interface by IPv6: an address, a regex over addresses, a
    // route lookup (host 2's route to host 0).
    for (i, flag) in [
        "--iface=2001:db8::10",
        "--iface-regex=^2001:db8::11$",
        "--iface-can-reach=2001:db8::10",
    ]
    .into_iter()
    .enumerate()
    {
        b = b.host_flags(i, &[flag]);
    }
    let mut o = b.start().unwrap();

    let leases = o.cluster.leases().unwrap();
    assert_eq!(leases.len(), 3, "{leases:?}");
    let mut envs = Vec::new();
    let mut macs = Vec::new();
    for (i, a) in o.agents.iter().enumerate() {
        let host = &o.cluster.hosts[i];
        let env = V6SubnetEnv::read(&a.subnet_file).unwrap();
        let first_host = a.subnet_env_value("FLANNEL_IPV6_SUBNET").unwrap();
        assert!(first_host.ends_with("::1/64"), "{first_host}");
        assert_eq!(
            std::fs::read_to_string(&a.subnet_file).unwrap(),
            format!("FLANNEL_IPV6_NETWORK={V6_NET}\nFLANNEL_IPV6_SUBNET={first_host}\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n")
        );
        let mac6 = device_mac(&host.ns, V6_DEV);
        let key = format!("{SUBNETS}0.0.0.0-0&{}", env.subnet.replace('/', "-"));
        let lease = leases
            .iter()
            .find(|kv| kv.key == key)
            .unwrap_or_else(|| panic!("no key {key}: {leases:?}"));
        assert_eq!(
            lease.value,
            format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::{}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#,
                10 + i
            )
        );
        // No IPv4 side: no flannel.1, no IPv4 rules, no blackhole route; IPv6 rules as in
        // dual stack.
        assert!(host.ns.ip(&["link", "show", "dev", "flannel.1"]).is_err());
        let link = host.ns.ip(&["-d", "link", "show", "dev", V6_DEV]).unwrap();
        assert!(
            link.contains(&format!("local 2001:db8::{}", 10 + i)),
            "{link}"
        );
        let v4_rules = host.ns.exec("iptables-save", &[]).unwrap();
        assert!(!v4_rules.contains("FLANNEL"), "{v4_rules}");
        let v6_rules = host.ns.exec("ip6tables-save", &[]).unwrap();
        for chain in ["FLANNEL-FWD", "FLANNEL-POSTRTG"] {
            assert!(v6_rules.contains(chain), "{chain} missing in {v6_rules}");
        }
        let blackholes = host.ns.ip(&["route", "show", "type", "blackhole"]).unwrap();
        assert!(blackholes.trim().is_empty(), "{blackholes}");
        envs.push(env);
        macs.push(mac6);
    }

    for h in 0..3 {
        for p in (0..3).filter(|p| *p != h) {
            let pub6 = format!("2001:db8::{}", 10 + p);
            wait_for(FOLLOW, "IPv6 peer entries", || {
                let e = v6_entries(&o.cluster.hosts[h].ns, &envs[p].subnet, &macs[p], &pub6);
                (e == (true, true, true)).then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}: host {h} peer {p}\n{}", o.agent_log(h)));
        }
    }

    let pods: Vec<V6Pod> = (0..3)
        .map(|i| V6Pod::attach(&o.cluster.hosts[i], &envs[i]).unwrap())
        .collect();
    for a in &pods {
        for b in pods.iter().filter(|b| b.v6 != a.v6) {
            wait_for(FOLLOW, "pod ping", || a.ping(b.v6).then_some(()))
                .unwrap_or_else(|e| panic!("{e}: {} -> {}", a.v6, b.v6));
            let t = tcp_send_ip(&a.ns, &b.ns, b.v6, 256 << 10)
                .unwrap_or_else(|e| panic!("TCP {} -> {}: {e:#}", a.v6, b.v6));
            assert_eq!(t.bytes, 256 << 10);
            assert_eq!(t.client, a.v6, "no NAT inside the overlay");
        }
    }

    // Host 1 restarts without its subnet.env: it finds its own lease by PublicIPv6 and leaves
    // the others' alone.
    o.agents[1].stop().unwrap();
    std::fs::remove_file(&o.agents[1].subnet_file).unwrap();
    o.start_agent(1).unwrap();
    let env1 = V6SubnetEnv::read(&o.agents[1].subnet_file).unwrap();
    assert_eq!(env1, envs[1]);
    let after = o.cluster.leases().unwrap();
    assert_eq!(after.len(), 3, "{after:?}");
    for (i, env) in envs.iter().enumerate() {
        let key = format!("{SUBNETS}0.0.0.0-0&{}", env.subnet.replace('/', "-"));
        let kv = after.iter().find(|kv| kv.key == key).unwrap();
        assert!(
            kv.value
                .contains(&format!("\"PublicIPv6\":\"2001:db8::{}\"", 10 + i)),
            "{kv:?}"
        );
    }
    wait_for(FOLLOW, "pod ping after the restart", || {
        pods[0].ping(pods[1].v6).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", o.agent_log(1)));

    // Host 2 leaves (lease deleted in etcd): its IPv6 neighbour, FDB entry and route go.
    o.agents[2].stop().unwrap();
    let key = format!("{SUBNETS}0.0.0.0-0&{}", envs[2].subnet.replace('/', "-"));
    o.cluster.etcd.del(&key).unwrap();
    for h in 0..2 {
        wait_for(FOLLOW, "a removed peer's IPv6 entries gone", || {
            let e = v6_entries(
                &o.cluster.hosts[h].ns,
                &envs[2].subnet,
                &macs[2],
                "2001:db8::12",
            );
            (e == (false, false, false)).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: host {h}\n{}", o.agent_log(h)));
    }
    assert!(pods[0].ping(pods[1].v6));
    assert!(pods[1].ping(pods[0].v6));
}

/// udp carries IPv4 only (as upstream's): an IPv6-only udp network is refused in one line
/// naming the key, without a lease or rules.
#[test]
fn ipv6_only_udp_is_refused_in_one_line_without_taking_a_lease_or_installing_rules() {
    let cluster = Cluster::new(1).unwrap();
    ipv6_underlay(&cluster).unwrap();
    cluster
        .set_config(r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"udp"}}"#)
        .unwrap();
    let agent = cluster.start_agent(0, &[]).unwrap();
    let line = wait_for(Duration::from_secs(20), "the refusal", || {
        agent
            .own_log()
            .lines()
            .find(|l| l.contains(" ERROR ") && l.contains("EnableIPv4"))
            .map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(line.contains("the udp backend carries IPv4 only"), "{line}");
    assert_eq!(agent.http_get("/readyz").map(|(s, _)| s).unwrap_or(0), 503);
    assert!(cluster.leases().unwrap().is_empty());
    let h = &cluster.hosts[0];
    let saved = h.ns.exec("iptables-save", &[]).unwrap();
    assert!(!saved.contains("FLANNEL"), "{saved}");
    assert!(h.ns.ip(&["link", "show", "dev", "flannel0"]).is_err());
}
