//! `EnableNFTables: true`: upstream's nftables tables and chains instead of iptables chains,
//! with the rule text upstream's e2e test expects; pods talk and masquerade as in iptables
//! mode; a flushed or deleted table comes back within the resync; `flanneld uninstall`
//! removes the tables.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use flannel_tests::traffic::tcp_send;
use flannel_tests::{wait_for, Overlay};

const VXLAN_NFT: &str =
    r#"{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#;

/// Upstream's e2e golden text (e2e/rules.go expectedNftPostrouting) for a node's subnet.
fn golden_postrtg(pod_cidr: &str) -> String {
    let net = "10.244.0.0/16";
    [
        "table ip flannel-ipv4 {".to_owned(),
        "\tchain postrtg {".to_owned(),
        "\t\tcomment \"chain to manage traffic masquerading by flannel\"".to_owned(),
        "\t\ttype nat hook postrouting priority srcnat; policy accept;".to_owned(),
        "\t\tmeta mark 0x00004000 return".to_owned(),
        format!("\t\tip saddr {pod_cidr} ip daddr {net} return"),
        format!("\t\tip saddr {net} ip daddr {pod_cidr} return"),
        format!("\t\tip saddr != {pod_cidr} ip daddr {net} return"),
        format!("\t\tip saddr {net} ip daddr != 224.0.0.0/4 masquerade fully-random"),
        format!("\t\tip saddr != {net} ip daddr {net} masquerade fully-random"),
        "\t}".to_owned(),
        "}".to_owned(),
    ]
    .join("\n")
}

/// Upstream's e2e golden text (e2e/rules.go expectedNftForward).
const GOLDEN_FORWARD: &str = "table ip flannel-ipv4 {\n\
\tchain forward {\n\
\t\tcomment \"chain to accept flannel traffic\"\n\
\t\ttype filter hook forward priority filter; policy accept;\n\
\t\tip saddr 10.244.0.0/16 accept\n\
\t\tip daddr 10.244.0.0/16 accept\n\
\t}\n\
}";

fn nft_chain(ns: &flannel_tests::Netns, chain: &str) -> String {
    ns.exec("nft", &["list", "chain", "ip", "flannel-ipv4", chain])
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

#[test]
fn nftables_mode_has_upstreams_tables_traffic_masquerade_and_resync() {
    let mut o = Overlay::builder(VXLAN_NFT, 2)
        .flags(&["--ip-masq", "--iptables-resync=1"])
        .ip_masq(true)
        .containers_per_host(0)
        .start()
        .unwrap();
    for (i, host) in o.cluster.hosts.iter().enumerate() {
        let subnet = o.agents[i].subnet().unwrap();
        assert_eq!(
            nft_chain(&host.ns, "postrtg"),
            golden_postrtg(&subnet),
            "{:?}\n{}",
            host.ns.exec("nft", &["list", "ruleset"]),
            o.agent_log(i)
        );
        assert_eq!(nft_chain(&host.ns, "forward"), GOLDEN_FORWARD);
        let ruleset = host.ns.exec("nft", &["list", "ruleset"]).unwrap();
        assert!(
            ruleset.contains("table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n}"),
            "{ruleset}"
        );
        assert!(
            ruleset.contains("table ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\"\n"),
            "{ruleset}"
        );
        // Not the iptables mode's chains as well.
        let nat = host.ns.exec("iptables-save", &[]).unwrap();
        assert!(!nat.contains("FLANNEL-"), "{nat}");
    }

    let h0ip = o.cluster.hosts[0].ip;
    let outside = o
        .cluster
        .add_outside("out", Ipv4Addr::new(192, 0, 2, 200))
        .unwrap();
    o.attach(0).unwrap();
    o.attach(1).unwrap();
    o.check_all_pairs(256 << 10).unwrap();
    let far = Ipv4Addr::new(192, 0, 2, 200);
    let seen = tcp_send(&o.containers[0].ns, &outside, far, 64 * 1024).unwrap();
    assert_eq!(
        seen.client,
        IpAddr::V4(h0ip),
        "masqueraded to the host address"
    );

    // Flushed, then deleted, by hand: back within the resync period (1 s here).
    let h0 = &o.cluster.hosts[0];
    let subnet0 = o.agents[0].subnet().unwrap();
    for damage in [
        &["flush", "table", "ip", "flannel-ipv4"][..],
        &["delete", "table", "ip", "flannel-ipv4"],
    ] {
        h0.ns.exec("nft", damage).unwrap();
        assert_ne!(nft_chain(&h0.ns, "postrtg"), golden_postrtg(&subnet0));
        wait_for(Duration::from_secs(5), "nftables rules restored", || {
            (nft_chain(&h0.ns, "postrtg") == golden_postrtg(&subnet0)
                && nft_chain(&h0.ns, "forward") == GOLDEN_FORWARD)
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e} after nft {damage:?}\n{}", o.agent_log(0)));
    }
    let seen = tcp_send(&o.containers[0].ns, &outside, far, 1024).unwrap();
    assert_eq!(seen.client, IpAddr::V4(h0ip));

    // uninstall, once the agent is stopped, removes both tables.
    let out = o.uninstall(0).unwrap();
    let h0 = &o.cluster.hosts[0];
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("nftables table ip flannel-ipv4 removed"),
        "{err}"
    );
    assert!(
        err.contains("nftables table ip6 flannel-ipv6 removed"),
        "{err}"
    );
    let ruleset = h0.ns.exec("nft", &["list", "ruleset"]).unwrap();
    assert!(!ruleset.contains("flannel"), "{ruleset}");
}

/// Upstream's e2e golden text for the IPv6 chains (expectedNft6Postrouting / expectedNft6Forward).
fn golden6(chain: &str, net6: &str, pod6: &str) -> String {
    let body: Vec<String> = if chain == "postrtg" {
        vec![
            "\t\tcomment \"chain to manage traffic masquerading by flannel\"".into(),
            "\t\ttype nat hook postrouting priority srcnat; policy accept;".into(),
            "\t\tmeta mark 0x00004000 return".into(),
            format!("\t\tip6 saddr {pod6} ip6 daddr {net6} return"),
            format!("\t\tip6 saddr {net6} ip6 daddr {pod6} return"),
            format!("\t\tip6 saddr != {pod6} ip6 daddr {net6} return"),
            format!("\t\tip6 saddr {net6} ip6 daddr != ff00::/8 masquerade fully-random"),
            format!("\t\tip6 saddr != {net6} ip6 daddr {net6} masquerade fully-random"),
        ]
    } else {
        vec![
            "\t\tcomment \"chain to accept flannel traffic\"".into(),
            "\t\ttype filter hook forward priority filter; policy accept;".into(),
            format!("\t\tip6 saddr {net6} accept"),
            format!("\t\tip6 daddr {net6} accept"),
        ]
    };
    let mut lines = vec![
        "table ip6 flannel-ipv6 {".to_owned(),
        format!("\tchain {chain} {{"),
    ];
    lines.extend(body);
    lines.push("\t}".into());
    lines.push("}".into());
    lines.join("\n")
}

#[test]
fn nftables_dual_stack_fills_the_ip6_table_as_upstream() {
    let o = Overlay::builder(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","EnableNFTables":true,"Backend":{"Type":"host-gw"}}"#,
        2,
    )
    .containers_per_host(0)
    .before_agents(flannel_tests::dual_stack::ipv6_underlay)
    .start()
    .unwrap();
    for (i, h) in o.cluster.hosts.iter().enumerate() {
        let env = std::fs::read_to_string(&o.agents[i].subnet_file).unwrap();
        let first6 = env
            .lines()
            .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
            .unwrap();
        let (ip, len) = first6.split_once('/').unwrap();
        let ip: std::net::Ipv6Addr = ip.parse().unwrap();
        let pod6 = format!("{}/{len}", std::net::Ipv6Addr::from(u128::from(ip) - 1));
        for chain in ["postrtg", "forward"] {
            let listed =
                h.ns.exec("nft", &["list", "chain", "ip6", "flannel-ipv6", chain])
                    .unwrap();
            assert_eq!(listed.trim_end(), golden6(chain, "fd00:10:244::/48", &pod6));
        }
        // Not ip6tables as well.
        let saved = h.ns.exec("ip6tables-save", &[]).unwrap();
        assert!(!saved.contains("FLANNEL-"), "{saved}");
    }
}

/// IPv6-only (EnableIPv4 false) in nftables mode: the ip6 table as in dual stack, the ip table
/// there (as upstream's Init creates both) but without chains.
#[test]
fn nftables_ipv6_only_fills_only_the_ip6_table() {
    let o = Overlay::builder(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","EnableNFTables":true,"Backend":{"Type":"vxlan"}}"#,
        2,
    )
    .containers_per_host(0)
    .before_agents(flannel_tests::dual_stack::ipv6_underlay)
    .start()
    .unwrap();
    for (i, h) in o.cluster.hosts.iter().enumerate() {
        let env = flannel_tests::dual_stack::V6SubnetEnv::read(&o.agents[i].subnet_file).unwrap();
        for chain in ["postrtg", "forward"] {
            let listed =
                h.ns.exec("nft", &["list", "chain", "ip6", "flannel-ipv6", chain])
                    .unwrap();
            assert_eq!(
                listed.trim_end(),
                golden6(chain, "fd00:10:244::/48", &env.subnet)
            );
        }
        let v4 =
            h.ns.exec("nft", &["list", "table", "ip", "flannel-ipv4"])
                .unwrap();
        assert!(!v4.contains("chain"), "{v4}");
        let saved = h.ns.exec("iptables-save", &[]).unwrap();
        assert!(!saved.contains("FLANNEL-"), "{saved}");
    }
}
